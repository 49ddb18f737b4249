"""The trigger guard: cross-field param rules refused before a run exists (ASGI level, no server)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugins"))

from quantpipe.form import conf_problem  # noqa: E402
from quantpipe_trigger_guard import TriggerParamsGuard  # noqa: E402


@pytest.mark.parametrize("conf, needle", [
    ({"method": "fp8", "bits": 4}, "does not support 4-bit"),
    ({"method": "awq", "bits": 8}, "does not support 8-bit"),
    ({"method": "int3"}, "method"),
    ({"run_name": "../../etc"}, "run_name"),
    ({"calibration_samples": 1}, "greater than or equal"),
    ([1, 2], "JSON object"),
])
def test_conf_problem_names_the_reason(conf, needle):
    problem = conf_problem(conf)
    assert problem and needle in problem, problem


@pytest.mark.parametrize("conf", [None, {}, {"method": "gptq", "bits": 4, "group_size": 64},
                                  {"method": "w8a8", "bits": 8, "run_name": "nightly-1"}])
def test_conf_problem_accepts_sound_confs(conf):
    assert conf_problem(conf) is None


def _call(path: str, payload, headers=((b"authorization", b"Bearer x"),), chunks: int = 1):
    """Drive the middleware like a server would; return (status, body, what the app received)."""
    seen: dict = {}

    async def app(scope, receive, send):
        msg = await receive()
        seen["body"] = msg["body"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"created"})

    raw = json.dumps(payload).encode()
    parts = [raw] if chunks == 1 else [raw[: len(raw) // 2], raw[len(raw) // 2:]]
    queue = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]
    sent: list = []

    async def receive():
        return queue.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": list(headers)}
    asyncio.run(TriggerParamsGuard(app)(scope, receive, send))
    status = sent[0]["status"]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return status, body, seen


def test_inconsistent_trigger_is_refused_with_the_reason_and_never_reaches_airflow():
    status, body, seen = _call("/api/v2/dags/llm_quantization/dagRuns",
                               {"logical_date": None, "conf": {"method": "fp8", "bits": 4}})
    assert status == 400 and "does not support 4-bit" in json.loads(body)["detail"]
    assert seen == {}


def test_sound_trigger_reaches_airflow_with_the_same_body_even_when_chunked():
    payload = {"logical_date": None, "conf": {"method": "gptq", "bits": 4, "group_size": 64}}
    status, body, seen = _call("/api/v2/dags/llm_quantization/dagRuns", payload, chunks=2)
    assert status == 200 and body == b"created"
    assert json.loads(seen["body"]) == payload


def test_backfill_conf_is_checked_too():
    status, body, _ = _call("/api/v2/backfills", {"dag_id": "llm_quantization", "from_date": "2026-01-01",
                                                   "to_date": "2026-01-02", "dag_run_conf": {"method": "nope"}})
    assert status == 400 and "method" in json.loads(body)["detail"]


@pytest.mark.parametrize("path, payload, headers", [
    ("/api/v2/dags/other_dag/dagRuns", {"conf": {"method": "fp8", "bits": 4}}, ((b"authorization", b"Bearer x"),)),
    ("/api/v2/dags/llm_quantization/dagRuns", {"conf": {"method": "fp8", "bits": 4}}, ()),  # Airflow answers 401
])
def test_other_dags_and_anonymous_requests_pass_through(path, payload, headers):
    status, _, seen = _call(path, payload, headers=headers)
    assert status == 200 and json.loads(seen["body"]) == payload
