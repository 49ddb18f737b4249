"""Switch-over and rollback behind one stable endpoint, with records in the artifact store.

Layout in the store::

    deployments/<name>/records/<record_id>/deployment.json   one per deploy or rollback
    deployments/<name>/records/<record_id>/expected.json     validated generations (health on rollback)
    deployments/<name>/current.json                          pointer to the live record (atomic replace)

One stable endpoint serves several names (run names) at once: the proxy routes by the
OpenAI ``model`` field, and each name has its own route, lock, records and switch-over.

The switch-over is decided from the memory read on the device (``placement.py``; the
decision and its reason are logged and kept in the record's ``switchover``):

- ``beside`` (or ``fresh``, nothing served yet): launch the new server on a free backend
  port (cuda: on the GPUs chosen) -> /health -> health check -> route the name to it ->
  write the record and the pointer -> drain the old server (the endpoint no longer sends it
  new requests; wait for those in flight, up to ``drain_timeout_s``) -> stop it. Any failure
  before the switch stops the new server; the old one never stopped serving.
- ``drain-and-replace``: the name's route is marked switching (new requests get 503 with
  Retry-After) -> drain the old server -> stop it -> launch the new one on the memory it
  freed -> health check -> route -> record. If the new server fails to start or fails its
  health check, the old model is started again at once (automatic rollback, a ``restore``
  record) and the error says so.
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
from . import placement
from . import server as srv
from .health import HealthError, require_healthy
from .proxy import PROTOCOL, read_state, route_entry, update_state
from .settings import DeploySettings
from .target import TargetInfo

log = logging.getLogger(__name__)
RECORD = "deployment.json"
EXPECTED = "expected.json"


class DeploymentRecord(BaseModel):
    name: str
    record_id: str
    kind: str  # deploy | rollback | restore (the old model started again after a failed drain-and-replace)
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
    switchover: dict | None = None  # mode, reason, memory read, devices, drain figures (placement.SwitchPlan)


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


def _proxy_protocol(s: DeploySettings) -> int | None:
    try:
        code, body = srv.http_get(f"{endpoint_url(s)}/proxy/ping", timeout=2)
        return json.loads(body).get("protocol") if code == 200 else 1
    except (OSError, ValueError):
        return None


def ensure_proxy(s: DeploySettings) -> srv.ServerHandle:
    """Start the stable endpoint if it is not running (it outlives the task, like the servers). A running
    proxy of an older protocol (one upstream per port) is replaced."""
    state, pidf = proxy_files(s)
    h = proxy_handle(s)
    if h is not None and srv.is_alive(h):
        proto = _proxy_protocol(s)
        if proto is None or proto >= PROTOCOL:
            return h
        log.info("stable endpoint pid %d speaks protocol %s; restarting it with protocol %d", h.pid, proto, PROTOCOL)
        srv.stop(h, 5)
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
        if _proxy_protocol(s) == PROTOCOL:
            pidf.write_text(h.model_dump_json())
            log.info("stable endpoint started: %s (pid %d)", endpoint_url(s), p.pid)
            return h
        if not srv.is_alive(h):
            break
        time.sleep(0.1)
    srv.stop(h, 5)
    raise PipelineError(f"stable endpoint did not start on {endpoint_url(s)}; see {log_path}")


def switch_endpoint(s: DeploySettings, upstream: srv.ServerHandle, record_uri: str | None,
                    api_key: str | None = None) -> None:
    """Route requests for ``upstream.served_model_name`` to it; other names' routes are untouched."""
    name = upstream.served_model_name

    def change(st: dict) -> None:
        st["routes"][name] = route_entry(upstream.base_url, api_key=api_key, salt=st["salt"], pid=upstream.pid,
                                         model_dir=upstream.model_dir, record_uri=record_uri, switched_at=_now())
    update_state(proxy_files(s)[0], change)
    log.info("stable endpoint %s: model %s -> %s", endpoint_url(s), name, upstream.base_url)


def hold_route(s: DeploySettings, name: str, api_key: str | None = None, why: str = "") -> None:
    """Stop routing new requests for ``name`` (they get 503 + Retry-After) while it is replaced."""
    def change(st: dict) -> None:
        old = st["routes"].get(name, {})
        st["routes"][name] = route_entry(None, state="switching", api_key=api_key, salt=st["salt"],
                                         previous_upstream=old.get("upstream"), switched_at=_now(), why=why)
    update_state(proxy_files(s)[0], change)
    log.info("stable endpoint %s: model %s held (no new requests) for the switch-over", endpoint_url(s), name)


def drop_route(s: DeploySettings, name: str) -> dict:
    """Remove ``name`` from the endpoint; returns the routes left."""
    def change(st: dict) -> None:
        st["routes"].pop(name, None)
    return update_state(proxy_files(s)[0], change)["routes"]


def proxy_status(s: DeploySettings, api_key: str | None = None, timeout: float = 5) -> dict | None:
    """The proxy's /proxy/status (routes, requests in flight per upstream); None when it does not answer.
    Asking makes the proxy reload its state: every request it routes afterwards sees the new routes."""
    try:
        code, body = srv.http_get(f"{endpoint_url(s)}/proxy/status", timeout=timeout, api_key=api_key)
    except OSError:
        return None
    if code != 200:
        raise PipelineError(f"{endpoint_url(s)}/proxy/status answered HTTP {code} (API key?)")
    return json.loads(body)


def drain(s: DeploySettings, upstream_url: str, api_key: str | None = None, timeout: float | None = None,
          poll: float = 0.2) -> dict:
    """Wait until the endpoint has no request in flight on ``upstream_url`` (no longer routed there), up to
    ``timeout`` (``drain_timeout_s``). Returns {drained, waited_s, in_flight_at_start, in_flight_left}."""
    timeout = s.drain_timeout_s if timeout is None else timeout
    t0 = time.monotonic()
    first = left = None
    while True:
        try:
            st = proxy_status(s, api_key)
        except PipelineError as e:  # e.g. this deploy has no key while other names have one: cannot count
            log.warning("drain of %s: cannot read the requests in flight (%s); waiting %.0f s instead",
                        upstream_url, e, min(timeout, 5.0))
            time.sleep(min(timeout, 5.0))
            return {"drained": False, "waited_s": round(time.monotonic() - t0, 2), "in_flight_at_start": None,
                    "in_flight_left": None, "error": str(e)}
        left = 0 if st is None else int(st.get("in_flight", {}).get(upstream_url, 0))
        first = left if first is None else first
        waited = time.monotonic() - t0
        if left == 0 or waited >= timeout:
            break
        time.sleep(poll)
    out = {"drained": left == 0, "waited_s": round(waited, 2), "in_flight_at_start": first, "in_flight_left": left}
    if left:
        log.warning("drain of %s: %d request(s) still in flight after %.0f s (drain_timeout_s); stopping it anyway",
                    upstream_url, left, waited)
    else:
        log.info("drained %s: %d request(s) were in flight, all finished after %.1f s", upstream_url, first, waited)
    return out


# ---- deploy / rollback -----------------------------------------------------------------------------------------

def _bring_up(s: DeploySettings, model_dir: Path, served_name: str, expected: list[dict], avoid: set[int],
              api_key: str | None, tag: str, devices: list[int] | None = None
              ) -> tuple[srv.ServerHandle, float, float]:
    """Launch and health-check a server; on any failure stop it and re-raise."""
    h = srv.launch(s, model_dir, served_name, port=srv.pick_port(s, avoid), api_key=api_key, tag=tag,
                   devices=devices)
    try:
        load_s = srv.wait_healthy(h, s.startup_timeout_s)
        health = require_healthy(h.base_url, served_name, expected, s, api_key)
        if not srv.is_alive(h):  # W4A16 on AVX2 answers /health, then dies on the first completion
            raise HealthError(f"vLLM pid {h.pid} died during the health check; log:\n{srv.log_tail(h)}")
    except BaseException:
        srv.stop(h, s.stop_timeout_s)
        raise
    return h, load_s, health.agreement


def plan_switchover(s: DeploySettings, target: TargetInfo, old: srv.ServerHandle | None,
                    need_bytes: int | None, reading: placement.MemoryReading | None = None) -> placement.SwitchPlan:
    """Read the device's memory (unless ``reading`` is given) and decide; the decision is logged."""
    if old is not None and reading is None and s.switchover == "auto":
        reading = placement.read_memory(target.name, s.command)
    plan = placement.decide_switchover(
        target=target.name, old_alive=old is not None, reading=reading, need_bytes=need_bytes,
        configured=s.switchover, old_devices=old.devices if old is not None else None,
        tensor_parallel_size=s.tensor_parallel_size, gpu_memory_utilization=s.gpu_memory_utilization,
        margin_bytes=int(s.switchover_margin_gib * placement.GiB))
    log.info("switch-over decision: %s (%s)", plan.mode, plan.reason)
    return plan


class _Attempt:
    """What one deploy knows; built once, used by both paths."""

    def __init__(self, store, s, name, run_id, model_dir, scheme, expected, report_uri, api_key, kind,
                 previous_override, rolled_back_from, cur):
        self.__dict__.update(locals())
        del self.__dict__["self"]

    def record(self, h: srv.ServerHandle, load_s: float, agreement: float, switch: dict, **over) -> DeploymentRecord:
        """This attempt's record; ``over`` replaces fields (a restore names the old model)."""
        fields = dict(kind=self.kind, run_id=self.run_id, model_uri=path_to_uri(self.model_dir), scheme=self.scheme,
                      report_uri=self.report_uri, rolled_back_from=self.rolled_back_from,
                      previous_record_uri=self.previous_override if self.kind == "rollback" else
                      (self.cur[0] if self.cur else None))
        fields.update(over)
        return DeploymentRecord(
            name=self.name, record_id=f"{time.strftime('%Y%m%dT%H%M%S')}-{fields['kind']}-{h.port}",
            served_model_name=self.name, endpoint_url=endpoint_url(self.s) + "/v1", server=h,
            load_seconds=round(load_s, 2), health_agreement=agreement, created=_now(), switchover=switch, **fields)


def deploy(store: ArtifactStore, s: DeploySettings, *, name: str, run_id: str, model_dir: Path, scheme: str,
           expected: list[dict], report_uri: str | None, api_key: str | None = None,
           kind: str = "deploy", previous_override: str | None = None,
           rolled_back_from: str | None = None, need_bytes: int | None = None,
           target: TargetInfo | None = None,
           reading: placement.MemoryReading | None = None) -> tuple[str, DeploymentRecord]:
    """Bring up ``model_dir`` behind the stable endpoint as ``name``; returns (record uri, record).

    ``need_bytes``: the new server's estimated memory (pre-flight); ``reading``: a memory reading to decide
    on instead of reading the device (tests)."""
    target = target or s.serving_target()
    s = s.resolved(target.name)
    with _lock(s, name):
        ensure_proxy(s)
        cur = current_record(store, name)
        old = cur[1].server if cur and srv.is_alive(cur[1].server) else None
        plan = plan_switchover(s, target, old, need_bytes, reading)
        a = _Attempt(store, s, name, run_id, model_dir, scheme, expected, report_uri, api_key, kind,
                     previous_override, rolled_back_from, cur)
        if plan.mode == "drain-and-replace":
            uri, rec = _drain_and_replace(a, old, plan)
        else:
            uri, rec = _beside(a, old, plan)
        log.info("%s %s: %s serves %s (record %s; switch-over %s)", kind, name, endpoint_url(s), model_dir, uri,
                 plan.mode)
        return uri, rec


def _beside(a: _Attempt, old: srv.ServerHandle | None, plan: placement.SwitchPlan) -> tuple[str, DeploymentRecord]:
    s = a.s
    t0 = time.monotonic()
    avoid = {old.port} if old else set()
    devices = list(plan.devices) if plan.devices is not None else None
    h, load_s, agreement = _bring_up(s, a.model_dir, a.name, a.expected, avoid, a.api_key, f"{a.name}-{a.kind}",
                                     devices)
    switch = plan.as_dict()
    replaces = old is not None and old.pid != h.pid
    try:
        switch_endpoint(s, h, None, a.api_key)  # new requests go to the new server from here on
        if replaces:  # the old one finishes what it was sent (it stays alive: the switch can still go back)
            switch.update(drain=drain(s, old.base_url, a.api_key), unavailable_seconds=0.0,
                          switch_seconds=round(time.monotonic() - t0, 2))
        rec = a.record(h, load_s, agreement, switch)
        uri = _write_record(a.store, rec, a.expected)
        switch_endpoint(s, h, uri, a.api_key)
    except BaseException:
        # the switch did not complete: give the endpoint back to the old server
        if old is not None:
            switch_endpoint(s, old, a.cur[0], a.api_key)
        else:
            drop_route(s, a.name)
        srv.stop(h, s.stop_timeout_s)
        raise
    if replaces:
        srv.stop(old, s.stop_timeout_s)
        log.info("switch-over %s of %s done in %.1f s; the old server (pid %d) stopped after its drain",
                 plan.mode, a.name, time.monotonic() - t0, old.pid)
    return uri, rec


def _drain_and_replace(a: _Attempt, old: srv.ServerHandle, plan: placement.SwitchPlan
                       ) -> tuple[str, DeploymentRecord]:
    s = a.s
    t0 = time.monotonic()
    hold_route(s, a.name, a.api_key, why=f"drain-and-replace: {plan.reason}")
    d = drain(s, old.base_url, a.api_key)
    srv.stop(old, s.stop_timeout_s)
    devices = list(plan.devices) if plan.devices is not None else None
    switch = {**plan.as_dict(), "drain": d}
    try:
        h, load_s, agreement = _bring_up(s, a.model_dir, a.name, a.expected, set(), a.api_key,
                                         f"{a.name}-{a.kind}", devices)
    except BaseException as e:
        restored = _restore(a, old, switch, e, t0)
        if restored is not None:
            e.restored = restored  # api.explain_failure says the old model serves again
        raise
    try:
        switch_endpoint(s, h, None, a.api_key)
        switch.update(unavailable_seconds=round(time.monotonic() - t0, 2),
                      switch_seconds=round(time.monotonic() - t0, 2))
        rec = a.record(h, load_s, agreement, switch)
        uri = _write_record(a.store, rec, a.expected)
        switch_endpoint(s, h, uri, a.api_key)
    except BaseException as e:
        srv.stop(h, s.stop_timeout_s)
        restored = _restore(a, old, switch, e, t0)
        if restored is not None:
            e.restored = restored
        raise
    log.info("drain-and-replace of %s done: %s unavailable for %.1f s", a.name, a.name, time.monotonic() - t0)
    return uri, rec


def _restore(a: _Attempt, old: srv.ServerHandle, switch: dict, err: BaseException, t0: float) -> dict | None:
    """The new server failed after the old one stopped: start the old model again (automatic rollback).
    Returns what was restored, or None when that failed too (the name is then not served)."""
    s, (cur_uri, cur_rec, cur_expected) = a.s, a.cur
    log.error("switch-over of %s failed after the old server stopped (%s); starting the previous model %s again",
              a.name, str(err).splitlines()[0][:300], cur_rec.model_uri)
    try:
        h, load_s, agreement = _bring_up(s, uri_to_path(cur_rec.model_uri), a.name, cur_expected, set(), a.api_key,
                                         f"{a.name}-restore", old.devices)
        switch_endpoint(s, h, None, a.api_key)
        sw = {**switch, "restored_after": f"{a.kind} of {path_to_uri(a.model_dir)} failed: "
                                          f"{str(err).splitlines()[0][:300]}",
              "unavailable_seconds": round(time.monotonic() - t0, 2)}
        rec = a.record(h, load_s, agreement, sw, kind="restore", model_uri=cur_rec.model_uri,
                       scheme=cur_rec.scheme, report_uri=cur_rec.report_uri,
                       previous_record_uri=cur_rec.previous_record_uri, rolled_back_from=None)
        uri = _write_record(a.store, rec, cur_expected)
        switch_endpoint(s, h, uri, a.api_key)
    except BaseException as e2:
        drop_route(s, a.name)
        log.error("restoring %s failed too (%s); nothing serves %s now", cur_rec.model_uri,
                  str(e2).splitlines()[0][:300], a.name)
        err.restore_error = str(e2)
        return None
    log.warning("automatic rollback: %s serves %s again (record %s), %.1f s after the switch-over began",
                a.name, cur_rec.model_uri, uri, time.monotonic() - t0)
    return {"record_uri": uri, "model_uri": cur_rec.model_uri, "scheme": cur_rec.scheme,
            "seconds": round(time.monotonic() - t0, 1), "replaced_record_uri": cur_uri}


def rollback(store: ArtifactStore, s: DeploySettings, *, name: str, run_id: str,
             api_key: str | None = None, need_bytes: int | None = None,
             target: TargetInfo | None = None) -> tuple[str, DeploymentRecord]:
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
                  previous_override=prev.previous_record_uri, rolled_back_from=cur_uri, need_bytes=need_bytes,
                  target=target)


def teardown(store: ArtifactStore, s: DeploySettings, name: str, stop_endpoint: bool | None = None) -> list[int]:
    """Stop the live server of ``name`` and take it off the endpoint; stop the endpoint too when
    ``stop_endpoint`` (None: when no other name is routed there). Returns the PIDs stopped."""
    stopped = []
    cur = current_record(store, name)
    if cur and srv.stop(cur[1].server, s.stop_timeout_s):
        stopped.append(cur[1].server.pid)
    state, _ = proxy_files(s)
    left = drop_route(s, name) if state.is_file() else {}
    if stop_endpoint or (stop_endpoint is None and not left):
        h = proxy_handle(s)
        if h and srv.stop(h, 5):
            stopped.append(h.pid)
    return stopped


def endpoint_status(s: DeploySettings) -> dict:
    """The endpoint's state file (routes by name), read directly (no key needed on this worker)."""
    return read_state(proxy_files(s)[0])


def route(s: DeploySettings, name: str) -> dict | None:
    """``name``'s route on the endpoint (upstream, state, record), without the key digest."""
    r = endpoint_status(s)["routes"].get(name)
    return {k: v for k, v in r.items() if k != "key_sha256"} if r is not None else None
