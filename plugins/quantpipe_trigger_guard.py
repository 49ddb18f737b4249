"""Refuse inconsistent trigger params at the API, before a DAG run exists.

Airflow validates each ``Param`` on its own (type, enum, bounds). Rules that span fields,
such as "fp8 has 8-bit weights only" or a run name that must be a safe folder name, are
known only to the typed settings (``quantpipe.settings``). This root middleware applies them
to the two REST calls that create runs of the guarded DAGs:

- ``POST /api/v2/dags/{dag_id}/dagRuns``  (the UI's trigger form posts here too)
- ``POST /api/v2/backfills``              (``dag_run_conf``)

and answers 400 with ``{"detail": "<reason>"}``, which the trigger form shows. Requests
without credentials pass through untouched so that Airflow answers them (401) as usual;
the DAG's ``validate_params`` task stays as the check for runs created in other ways
(scheduled, asset-triggered, ``TriggerDagRunOperator``).
"""

from __future__ import annotations

import json
import logging
import re

from airflow.plugins_manager import AirflowPlugin

log = logging.getLogger(__name__)

GUARDED_DAGS = frozenset({"llm_quantization"})
_TRIGGER = re.compile(r"^/api/v2/dags/(?P<dag_id>[^/]+)/dagRuns/?$")
_BACKFILL = re.compile(r"^/api/v2/backfills/?$")
MAX_BODY = 1 << 20


def _has_credentials(scope) -> bool:
    for name, value in scope.get("headers") or ():
        if name == b"authorization" or (name == b"cookie" and b"_token=" in value):
            return True
    return False


def _problem(path: str, body: bytes) -> str | None:
    m = _TRIGGER.match(path)
    try:
        payload = json.loads(body or b"{}")
    except ValueError:
        return None  # not JSON: Airflow's own validation answers it
    if not isinstance(payload, dict):
        return None
    if m:
        dag_id, conf = m["dag_id"], payload.get("conf")
    else:
        dag_id, conf = payload.get("dag_id"), payload.get("dag_run_conf")
    if dag_id not in GUARDED_DAGS:
        return None
    from quantpipe.form import conf_problem

    problem = conf_problem(conf)
    return f"invalid params for {dag_id}: {problem}" if problem else None


class TriggerParamsGuard:
    """Pure ASGI middleware: reads the body of run-creating POSTs, replays it downstream."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if (scope["type"] != "http" or scope.get("method") != "POST"
                or not (_TRIGGER.match(path) or _BACKFILL.match(path)) or not _has_credentials(scope)):
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            chunks.append(chunk)
            more = message.get("more_body", False)
            if size > MAX_BODY:
                return await _answer(send, 413, f"request body over {MAX_BODY} bytes")
        body = b"".join(chunks)
        problem = _problem(path, body)
        if problem:
            log.warning("refused run creation on %s: %s", path, problem)
            return await _answer(send, 400, problem)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _answer(send, status: int, detail: str) -> None:
    data = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


class QuantpipeTriggerGuardPlugin(AirflowPlugin):
    name = "quantpipe_trigger_guard"
    fastapi_root_middlewares = [{"name": "quantpipe-trigger-params-guard", "middleware": TriggerParamsGuard}]
