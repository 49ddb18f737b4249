"""A real Airflow instance for the UI tests: api-server, scheduler, dag-processor and triggerer
on 127.0.0.1 with their own port, AIRFLOW_HOME and artifact root (scripts/airflow_local.py),
stopped by PID at the end of the session."""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def airflow_instance():
    """Module ``airflow_local`` bound to a fresh home/port; yields it with ``.artifact_root``."""
    work = Path(tempfile.mkdtemp(prefix="quantpipe-ui-"))
    port = _free_port()
    saved = {k: os.environ.get(k) for k in ("QUANTPIPE_AIRFLOW_HOME", "QUANTPIPE_AIRFLOW_PORT",
                                             "QUANTPIPE_ARTIFACT_ROOT")}
    os.environ.update({"QUANTPIPE_AIRFLOW_HOME": str(work / "airflow"), "QUANTPIPE_AIRFLOW_PORT": str(port),
                       "QUANTPIPE_ARTIFACT_ROOT": str(work / "artifacts")})
    spec = importlib.util.spec_from_file_location(f"airflow_local_ui_{port}", REPO / "scripts" / "airflow_local.py")
    af = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(af)  # reads HOME/PORT at import
    af.artifact_root = work / "artifacts"
    af.work = work
    try:
        af.start()
        yield af
    finally:
        af.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def wait_for_dag(af, dag_id: str, token: str, timeout_s: int = 180) -> None:
    import time

    deadline = time.time() + timeout_s
    while True:
        status, body = af._http("GET", f"/api/v2/dags/{dag_id}", token=token)
        if status == 200:
            return
        if time.time() > deadline:
            raise AssertionError(f"DAG {dag_id} not parsed within {timeout_s} s: {status} {body}")
        time.sleep(3)


@pytest.fixture(scope="session")
def admin_token(airflow_instance) -> str:
    return airflow_instance.token("admin")


sys.path.insert(0, str(REPO / "plugins"))
