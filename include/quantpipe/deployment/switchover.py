"""Switch-over and rollback behind one stable endpoint, with records in the artifact store.

Layout in the store::

    deployments/<name>/records/<record_id>/deployment.json   one per deploy or rollback
    deployments/<name>/records/<record_id>/expected.json     validated generations (health on rollback)
    deployments/<name>/current.json                          pointer to the live record (atomic replace)

Order of a deploy: launch the new server beside the old one on a free backend
port -> /health -> greedy health check -> point the stable endpoint at it ->
write the record and the pointer -> stop the old server. Any failure before the
switch stops the new server and leaves the endpoint, the pointer and the old
server untouched.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pydantic import BaseModel

from ..artifacts import ArtifactStore, path_to_uri, uri_to_path
from ..errors import PipelineError
from ..procs import start_ticks
from . import server as srv
from .health import HealthError, require_healthy
from .proxy import read_state, write_state
from .settings import DeploySettings

log = logging.getLogger(__name__)
RECORD = "deployment.json"
EXPECTED = "expected.json"


class DeploymentRecord(BaseModel):
    name: str
    record_id: str
    kind: str  # deploy | rollback
    run_id: str
    model_uri: str
    scheme: str
    report_uri: str | None = None
    served_model_name: str
    endpoint_url: str
    server: srv.ServerHandle
    load_seconds: float
    health_agreement: float
    previous_record_uri: str | None = None
    rolled_back_from: str | None = None
    created: str


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def endpoint_url(s: DeploySettings) -> str:
    return f"http://{s.host}:{s.endpoint_port}"


@contextmanager
def _lock(s: DeploySettings, name: str) -> Iterator[None]:
    s.state_dir.mkdir(parents=True, exist_ok=True)
    with open(s.state_dir / f"deploy-{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---- records -------------------------------------------------------------------------------------------------

def current_pointer(store: ArtifactStore, name: str) -> Path:
    return store.path("deployments", name, "current.json")


def load_record(uri: str) -> tuple[DeploymentRecord, list[dict]]:
    folder = uri_to_path(uri)
    try:
        rec = DeploymentRecord.model_validate_json((folder / RECORD).read_text())
        expected = json.loads((folder / EXPECTED).read_text())
    except (OSError, ValueError) as e:
        raise PipelineError(f"deployment record {uri} is unreadable: {e}") from e
    return rec, expected


def current_record(store: ArtifactStore, name: str) -> tuple[str, DeploymentRecord, list[dict]] | None:
    ptr = current_pointer(store, name)
    if not ptr.is_file():
        return None
    uri = json.loads(ptr.read_text())["record_uri"]
    rec, expected = load_record(uri)
    return uri, rec, expected


def _write_record(store: ArtifactStore, rec: DeploymentRecord, expected: list[dict]) -> str:
    parts = ("deployments", rec.name, "records", rec.record_id)
    with store.writing(*parts, meta={"kind": rec.kind, "model_uri": rec.model_uri}) as out:
        (out / RECORD).write_text(rec.model_dump_json(indent=1))
        (out / EXPECTED).write_text(json.dumps(expected, indent=1))
    uri = store.uri(*parts)
    ptr = current_pointer(store, rec.name)
    ptr.parent.mkdir(parents=True, exist_ok=True)
    tmp = ptr.with_name(f".current.{os.getpid()}")
    tmp.write_text(json.dumps({"record_uri": uri, "updated": _now()}))
    os.replace(tmp, ptr)
    return uri


# ---- the stable endpoint ---------------------------------------------------------------------------------------

def proxy_files(s: DeploySettings) -> tuple[Path, Path]:
    return s.state_dir / f"endpoint-{s.endpoint_port}.json", s.state_dir / f"endpoint-{s.endpoint_port}.pid.json"


def proxy_handle(s: DeploySettings) -> srv.ServerHandle | None:
    _, pidf = proxy_files(s)
    if not pidf.is_file():
        return None
    try:
        return srv.ServerHandle.model_validate_json(pidf.read_text())
    except ValueError:
        return None


def ensure_proxy(s: DeploySettings) -> srv.ServerHandle:
    """Start the stable endpoint if it is not running (it outlives the task, like the servers)."""
    state, pidf = proxy_files(s)
    h = proxy_handle(s)
    if h is not None and srv.is_alive(h):
        return h
    if not srv.port_free(s.host, s.endpoint_port):
        raise PipelineError(f"stable endpoint port {s.host}:{s.endpoint_port} is taken by a process this "
                            "pipeline did not start; set QUANTPIPE_DEPLOY_ENDPOINT_PORT")
    logs = s.state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"endpoint-{s.endpoint_port}.log"
    argv = [sys.executable, "-m", "quantpipe.deployment.proxy", "--state", str(state), "--host", s.host,
            "--port", str(s.endpoint_port)]
    with open(log_path, "ab") as out:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True, close_fds=True)
    ticks = None
    for _ in range(50):
        ticks = start_ticks(p.pid)
        if ticks is not None:
            break
        time.sleep(0.02)
    h = srv.ServerHandle(pid=p.pid, start_ticks=ticks or -1, host=s.host, port=s.endpoint_port, model_dir="",
                         served_model_name="", log_path=str(log_path), launched_at=time.time(), argv=argv)
    deadline = time.time() + 15
    while time.time() < deadline:
        try:
            if srv.http_get(f"{endpoint_url(s)}/proxy/status", timeout=1)[0] == 200:
                pidf.write_text(h.model_dump_json())
                log.info("stable endpoint started: %s (pid %d)", endpoint_url(s), p.pid)
                return h
        except OSError:
            pass
        if not srv.is_alive(h):
            break
        time.sleep(0.1)
    srv.stop(h, 5)
    raise PipelineError(f"stable endpoint did not start on {endpoint_url(s)}; see {log_path}")


def switch_endpoint(s: DeploySettings, upstream: srv.ServerHandle, record_uri: str | None) -> None:
    state, _ = proxy_files(s)
    write_state(state, {"upstream": upstream.base_url, "model": upstream.served_model_name,
                        "model_dir": upstream.model_dir, "pid": upstream.pid, "record_uri": record_uri,
                        "switched_at": _now()})
    log.info("stable endpoint %s -> %s", endpoint_url(s), upstream.base_url)


# ---- deploy / rollback -----------------------------------------------------------------------------------------

def _bring_up(s: DeploySettings, model_dir: Path, served_name: str, expected: list[dict], avoid: set[int],
              api_key: str | None, tag: str) -> tuple[srv.ServerHandle, float, float]:
    """Launch beside the current server and health-check it; on any failure stop it and re-raise."""
    h = srv.launch(s, model_dir, served_name, port=srv.pick_port(s, avoid), api_key=api_key, tag=tag)
    try:
        load_s = srv.wait_healthy(h, s.startup_timeout_s)
        health = require_healthy(h.base_url, served_name, expected, s, api_key)
        if not srv.is_alive(h):  # W4A16 on AVX2 answers /health, then dies on the first completion
            raise HealthError(f"vLLM pid {h.pid} died during the health check; log:\n{srv.log_tail(h)}")
    except BaseException:
        srv.stop(h, s.stop_timeout_s)
        raise
    return h, load_s, health.agreement


def deploy(store: ArtifactStore, s: DeploySettings, *, name: str, run_id: str, model_dir: Path, scheme: str,
           expected: list[dict], report_uri: str | None, api_key: str | None = None,
           kind: str = "deploy", previous_override: str | None = None,
           rolled_back_from: str | None = None) -> tuple[str, DeploymentRecord]:
    """Bring up ``model_dir`` behind the stable endpoint; returns (record uri, record)."""
    with _lock(s, name):
        cur = current_record(store, name)
        old = cur[1].server if cur and srv.is_alive(cur[1].server) else None
        avoid = {old.port} if old else set()
        h, load_s, agreement = _bring_up(s, model_dir, name, expected, avoid, api_key, f"{name}-{kind}")
        try:
            ensure_proxy(s)
            switch_endpoint(s, h, None)
            rec = DeploymentRecord(
                name=name, record_id=f"{time.strftime('%Y%m%dT%H%M%S')}-{kind}-{h.port}", kind=kind, run_id=run_id,
                model_uri=path_to_uri(model_dir), scheme=scheme, report_uri=report_uri, served_model_name=name,
                endpoint_url=endpoint_url(s) + "/v1", server=h, load_seconds=round(load_s, 2),
                health_agreement=agreement,
                previous_record_uri=previous_override if kind == "rollback" else (cur[0] if cur else None),
                rolled_back_from=rolled_back_from, created=_now())
            uri = _write_record(store, rec, expected)
            switch_endpoint(s, h, uri)
        except BaseException:
            # the switch did not complete: give the endpoint back to the old server
            if old is not None:
                switch_endpoint(s, old, cur[0])
            srv.stop(h, s.stop_timeout_s)
            raise
        if old is not None and old.pid != h.pid:
            srv.stop(old, s.stop_timeout_s)
        log.info("%s %s: %s serves %s (record %s)", kind, name, endpoint_url(s), model_dir, uri)
        return uri, rec


def rollback(store: ArtifactStore, s: DeploySettings, *, name: str, run_id: str,
             api_key: str | None = None) -> tuple[str, DeploymentRecord]:
    """Serve the previous record's model again; the new record points one step further back."""
    cur = current_record(store, name)
    if cur is None:
        raise PipelineError(f"no deployment named {name!r} in {store.root}; nothing to roll back")
    cur_uri, rec, _ = cur
    if not rec.previous_record_uri:
        raise PipelineError(f"deployment {name!r} ({cur_uri}) has no previous record to roll back to")
    prev, expected = load_record(rec.previous_record_uri)
    model_dir = uri_to_path(prev.model_uri)
    if not model_dir.is_dir():
        raise PipelineError(f"the previous model {prev.model_uri} no longer exists; cannot roll back")
    log.info("rolling back %s from %s to %s", name, rec.model_uri, prev.model_uri)
    return deploy(store, s, name=name, run_id=run_id, model_dir=model_dir, scheme=prev.scheme, expected=expected,
                  report_uri=prev.report_uri, api_key=api_key, kind="rollback",
                  previous_override=prev.previous_record_uri, rolled_back_from=cur_uri)


def teardown(store: ArtifactStore, s: DeploySettings, name: str, stop_endpoint: bool = True) -> list[int]:
    """Stop the live server of ``name`` and (optionally) the stable endpoint. Returns the PIDs stopped."""
    stopped = []
    cur = current_record(store, name)
    if cur and srv.stop(cur[1].server, s.stop_timeout_s):
        stopped.append(cur[1].server.pid)
    if stop_endpoint:
        h = proxy_handle(s)
        if h and srv.stop(h, 5):
            stopped.append(h.pid)
    return stopped


def endpoint_status(s: DeploySettings) -> dict:
    return read_state(proxy_files(s)[0])
