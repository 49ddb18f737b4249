"""Entry points for the DAG tasks (queue ``serving``): small dicts in, small dicts out.

``deploy_approved`` runs pre-flight, brings the approved model up beside the live
one, health-checks it against the validation report, switches the stable
endpoint and stops the old server. ``rollback`` serves the previous record again.
Clients always call the stable endpoint ``http://HOST:ENDPOINT_PORT/v1`` with the
model name = the run name (``params['run_name']``).
"""

from __future__ import annotations

import logging
import os

from ..artifacts import ArtifactStore
from ..store import Store
from ..errors import PipelineError
from ..settings import PipelineParams
from . import switchover
from .health import HealthError
from .preflight import PreflightError, check_report, model_max_len, run_preflight
from .server import LaunchError, group_rss_bytes, is_alive
from .settings import DeploySettings
from .target import FAST_METHOD, TargetInfo

log = logging.getLogger(__name__)


def _api_key(s: DeploySettings, api_key: str | None) -> str | None:
    return api_key if api_key else (os.environ.get(s.api_key_env) or None)


def _summary(uri: str, rec: switchover.DeploymentRecord) -> dict:
    sw = rec.switchover or {}
    return {"endpoint_url": rec.endpoint_url, "model": rec.served_model_name, "model_uri": rec.model_uri,
            "scheme": rec.scheme, "pid": rec.server.pid, "port": rec.server.port,
            "server_url": rec.server.base_url, "record_uri": uri, "kind": rec.kind,
            "load_seconds": rec.load_seconds, "health_agreement": rec.health_agreement,
            "previous_record_uri": rec.previous_record_uri, "log_path": rec.server.log_path,
            "switchover": {k: sw.get(k) for k in ("mode", "reason", "devices", "drain", "unavailable_seconds")}}


def _live_rss(store: ArtifactStore, name: str) -> int:
    """Memory the name's live server holds (freed when a drain-and-replace stops it)."""
    cur = switchover.current_record(store, name)
    return group_rss_bytes(cur[1].server) if cur and is_alive(cur[1].server) else 0


def explain_failure(err: Exception, scheme: str, target: TargetInfo, s: DeploySettings) -> str:
    """One paragraph for a failed launch or health check: what went wrong, why it may have, what to try.
    The original message (with the end of the server's log) follows it. A drain-and-replace that started
    the old model again (``err.restored``) or could not (``err.restore_error``) says so."""
    msg = str(err)
    low = msg.lower()
    if "timed out" in low:
        what = f"the health check timed out (request_timeout_s={s.request_timeout_s:g} s per request)"
    elif "not healthy after" in low:
        what = f"vLLM did not answer /health within startup_timeout_s={s.startup_timeout_s:g} s"
    elif "exited during startup" in low:
        what = "vLLM exited during startup"
    elif "died during the health check" in low:
        what = "vLLM died on its first completions"
    elif "health check failed" in low:
        what = "vLLM answers unlike the validated model"
    else:
        what = "the launch or health check failed"
    why, tries = "", []
    slow = target.slow_fallback(scheme)
    fast = FAST_METHOD[target.name]
    if slow:
        why = f"; scheme {scheme} runs through a slow fallback on {target.name} ({target.reason})"
        tries.append(f"quantize with method {fast} (served fast on {target.name})")
    if "timed out" in low or "not healthy after" in low:
        tries.append("check the machine's load, or raise QUANTPIPE_DEPLOY_REQUEST_TIMEOUT_S / "
                     "QUANTPIPE_DEPLOY_STARTUP_TIMEOUT_S")
    elif "exited during startup" in low or "died during" in low:
        tries.append("read the end of the server log below; a scheme this build cannot run dies like this "
                     f"(target {target.name}: {target.reason}; set QUANTPIPE_DEPLOY_TARGET if the detection is "
                     "wrong)")
    elif "health check failed" in low:
        tries.append("check the checkpoint's config.json against the validated model's")
    if not tries:
        tries.append("read the server log below")
    restored, lost = getattr(err, "restored", None), getattr(err, "restore_error", None)
    after = ""
    if restored:
        after = (f" Automatic rollback: the previous model ({restored['scheme']}, {restored['model_uri']}) serves "
                 f"again, {restored['seconds']:g} s after the switch-over began (record {restored['record_uri']}).")
    elif lost:
        after = (" Starting the previous model again failed too, so nothing serves this name now: "
                 f"{lost.splitlines()[0][:300]}.")
    return f"deploy failed: {what}{why}.{after} Try: {'; or '.join(tries)}. Details: {msg}"


def deploy_approved(params: dict, approved: dict, validation: dict, run_id: str, *, artifacts: Store,
                    api_key: str | None = None, settings: dict | None = None) -> dict:
    """Deploy ``approved['approved_uri']``, read through ``artifacts`` (an S3 model is staged into this
    node's cache and verified first); returns a small XCom-able dict (no secrets). Deployment records
    stay on this serving node, under its local artifact root."""
    p = PipelineParams.model_validate(params)
    s = DeploySettings.load(settings)
    store = ArtifactStore(artifacts.artifact_root)
    if not approved or not approved.get("approved_uri"):
        raise PipelineError("no approved_uri from publish_approved; nothing to deploy")
    model_dir = artifacts.local_path(approved["approved_uri"])
    target = s.serving_target()
    s = s.resolved(target.name, model_max_len(model_dir))  # the target's defaults for limits left unset
    try:
        report = check_report(validation, approved["approved_uri"], artifacts)
        pf = run_preflight(model_dir, s, target=target, reclaimable_bytes=_live_rss(store, p.run_name))
    except PreflightError as e:
        raise PreflightError(f"deploy refused by pre-flight: {e}") from e
    log.info("pre-flight passed: %s on %s, weights %.1f MB, needs ~%s GiB", pf.scheme, pf.target,
             pf.weights_bytes / 1e6, f"{pf.memory_needed_bytes / 2**30:.1f}" if pf.memory_needed_bytes else "?")
    try:
        uri, rec = switchover.deploy(store, s, name=p.run_name, run_id=run_id, model_dir=model_dir,
                                     scheme=pf.scheme, expected=report["generations"]["quantized"],
                                     report_uri=validation["report_uri"], api_key=_api_key(s, api_key),
                                     need_bytes=pf.memory_needed_bytes, target=target)
    except (LaunchError, HealthError) as e:
        raise type(e)(explain_failure(e, pf.scheme, target, s)) from e
    return {**_summary(uri, rec), "target": pf.target}


def rollback(name: str, run_id: str, *, artifacts: Store, api_key: str | None = None,
             settings: dict | None = None) -> dict:
    """Restore the previous deployment of ``name`` (the run name); returns the new record's summary."""
    s = DeploySettings.load(settings)
    store = ArtifactStore(artifacts.artifact_root)
    target = s.serving_target()
    need = None
    cur = switchover.current_record(store, name)
    if cur and cur[1].previous_record_uri:  # size the previous model for the switch-over decision
        prev_dir = artifacts.local_path(switchover.load_record(cur[1].previous_record_uri)[0].model_uri)
        if prev_dir.is_dir():
            s = s.resolved(target.name, model_max_len(prev_dir))
            try:
                need = run_preflight(prev_dir, s, target=target,
                                     reclaimable_bytes=_live_rss(store, name)).memory_needed_bytes
            except PreflightError as e:
                raise PreflightError(f"rollback refused by pre-flight: {e}") from e
    try:
        uri, rec = switchover.rollback(store, s, name=name, run_id=run_id, api_key=_api_key(s, api_key),
                                       need_bytes=need, target=target)
    except (LaunchError, HealthError) as e:
        raise type(e)(explain_failure(e, "?", target, s)) from e
    return _summary(uri, rec)


def status(name: str, settings: dict | None = None, *, artifacts: Store) -> dict:
    """The live record of ``name`` and whether its server is alive."""
    s = DeploySettings.load(settings)
    store = ArtifactStore(artifacts.artifact_root)
    cur = switchover.current_record(store, name)
    if cur is None:
        return {"name": name, "deployed": False}
    return {**_summary(cur[0], cur[1]), "alive": is_alive(cur[1].server),
            "endpoint": switchover.route(s, name)}
