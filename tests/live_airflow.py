"""A real Airflow instance shared by the tests that need one (UI, plugins, worker faults):
api-server, scheduler, dag-processor and triggerer on 127.0.0.1 with their own port,
AIRFLOW_HOME and artifact root (scripts/airflow_local.py), stopped by PID at the end of
the session. Each test sets the DAG state it needs (paused or not) itself."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _env(overrides: dict[str, str]):
    saved = {k: os.environ.get(k) for k in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def airflow_instance():
    """Module ``airflow_local`` bound to a fresh home/port; yields it with ``.artifact_root``.

    The instance's variables are set only while it starts and stops, so tests that run
    in-process (``dag.test``) after it started keep the session's own artifact root."""
    work = Path(tempfile.mkdtemp(prefix="quantpipe-ui-"))
    port = _free_port()
    env = {"QUANTPIPE_AIRFLOW_HOME": str(work / "airflow"), "QUANTPIPE_AIRFLOW_PORT": str(port),
           "QUANTPIPE_ARTIFACT_ROOT": str(work / "artifacts")}
    spec = importlib.util.spec_from_file_location(f"airflow_local_ui_{port}", REPO / "scripts" / "airflow_local.py")
    af = importlib.util.module_from_spec(spec)
    with _env(env):
        spec.loader.exec_module(af)  # reads HOME/PORT at import
    af.artifact_root = work / "artifacts"
    af.work = work
    try:
        with _env(env):
            af.start()
        yield af
    finally:
        with _env(env):
            af.stop()
        shutil.rmtree(work, ignore_errors=True)


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
