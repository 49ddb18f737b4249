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

from ..artifacts import ArtifactStore, uri_to_path
from ..errors import PipelineError
from ..settings import Environment, PipelineParams
from . import switchover
from .preflight import check_report, run_preflight
from .settings import DeploySettings

log = logging.getLogger(__name__)


def _api_key(s: DeploySettings, api_key: str | None) -> str | None:
    return api_key if api_key else (os.environ.get(s.api_key_env) or None)


def _summary(uri: str, rec: switchover.DeploymentRecord) -> dict:
    return {"endpoint_url": rec.endpoint_url, "model": rec.served_model_name, "model_uri": rec.model_uri,
            "scheme": rec.scheme, "pid": rec.server.pid, "port": rec.server.port,
            "server_url": rec.server.base_url, "record_uri": uri, "kind": rec.kind,
            "load_seconds": rec.load_seconds, "health_agreement": rec.health_agreement,
            "previous_record_uri": rec.previous_record_uri, "log_path": rec.server.log_path}


def deploy_approved(params: dict, approved: dict, validation: dict, run_id: str, *, api_key: str | None = None,
                    settings: dict | None = None) -> dict:
    """Deploy ``approved['approved_uri']``; returns a small XCom-able dict (no secrets)."""
    p = PipelineParams.model_validate(params)
    s = DeploySettings.load(settings)
    store = ArtifactStore(Environment.from_env().artifact_root)
    if not approved or not approved.get("approved_uri"):
        raise PipelineError("no approved_uri from publish_approved; nothing to deploy")
    report = check_report(validation, approved["approved_uri"])
    model_dir = uri_to_path(approved["approved_uri"])
    pf = run_preflight(model_dir, s)
    for note in pf.notes:
        log.warning("pre-flight: %s", note)
    log.info("pre-flight passed: %s, weights %.1f MB, needs ~%s GiB", pf.scheme, pf.weights_bytes / 1e6,
             f"{pf.memory_needed_bytes / 2**30:.1f}" if pf.memory_needed_bytes else "?")
    uri, rec = switchover.deploy(store, s, name=p.run_name, run_id=run_id, model_dir=model_dir, scheme=pf.scheme,
                                 expected=report["generations"]["quantized"], report_uri=validation["report_uri"],
                                 api_key=_api_key(s, api_key))
    return _summary(uri, rec)


def rollback(name: str, run_id: str, *, api_key: str | None = None, settings: dict | None = None) -> dict:
    """Restore the previous deployment of ``name`` (the run name); returns the new record's summary."""
    s = DeploySettings.load(settings)
    store = ArtifactStore(Environment.from_env().artifact_root)
    uri, rec = switchover.rollback(store, s, name=name, run_id=run_id, api_key=_api_key(s, api_key))
    return _summary(uri, rec)


def status(name: str, settings: dict | None = None) -> dict:
    """The live record of ``name`` and whether its server is alive."""
    from .server import is_alive

    s = DeploySettings.load(settings)
    store = ArtifactStore(Environment.from_env().artifact_root)
    cur = switchover.current_record(store, name)
    if cur is None:
        return {"name": name, "deployed": False}
    return {**_summary(cur[0], cur[1]), "alive": is_alive(cur[1].server),
            "endpoint": switchover.endpoint_status(s)}
