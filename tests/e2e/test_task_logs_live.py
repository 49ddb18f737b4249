"""Task logs a person reads, on a real Airflow (tests/live_airflow.py: api-server, scheduler,
dag-processor, triggerer, LocalExecutor; each task in Airflow's supervised task process).

Airflow 3's supervisor records every line a task writes to stderr at ERROR. A green run of the
real DAG (GPTQ with calibration, llm-compressor's loguru, compressed-tensors' bars, lm-eval's
bars, transformers' and torch's notices) must show no ERROR line in the logs of its green
tasks, read through the REST API as a person's browser reads them; its stages log their counts
and rates as INFO. A run that fails (a held-out file that does not exist) must show ERROR lines
in the failed task's log: the check can fail, and errors are not hidden.
"""

from __future__ import annotations

import json
import time
from urllib.parse import quote

import pytest

from ..live_airflow import wait_for_dag

DAG = "llm_quantization"
GREEN = {"method": "gptq", "bits": 4, "group_size": 64, "run_name": "logs-green", "seed": 5151,
         "calibration_samples": 16, "max_seq_length": 128, "ppl_max_tokens": 1024, "num_prompts": 2,
         "max_new_tokens": 8, "task_limit": 4, "sensitivity_layers": 0, "time_budget_s": 0,
         "remediation": False, "deploy": False}
FAILING = {"method": "fp8", "bits": 8, "run_name": "logs-failing", "deploy": False,
           "eval_domains_path": "/nonexistent/quantpipe-logs-test/held-out.jsonl"}
GREEN_TASKS = ("validate_params", "prep_checkpoint", "build_calibration", "route", "quantize", "validate")
ERROR_LEVELS = ("error", "critical", "fatal", "exception")

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def _run_path(run_id: str) -> str:
    return f"/api/v2/dags/{DAG}/dagRuns/{quote(run_id, safe='')}"


def _trigger(af, token, conf: dict) -> str:
    status, run = af._http("POST", f"/api/v2/dags/{DAG}/dagRuns", {"logical_date": None, "conf": conf}, token)
    assert status in (200, 201), run
    return run["dag_run_id"]


def _await_end(af, token, run_id: str, timeout_s: int) -> dict[str, str | None]:
    t0, last = time.time(), None
    while True:
        status, run = af._http("GET", _run_path(run_id), token=token)
        assert status == 200, run
        status, body = af._http("GET", f"{_run_path(run_id)}/taskInstances?limit=100", token=token)
        assert status == 200, body
        states = {t["task_id"]: t["state"] for t in body["task_instances"]}
        if states != last:
            print(f"  {time.time() - t0:5.0f} s {run_id}: " + ", ".join(f"{k}={v}" for k, v in states.items() if v))
            last = states
        if run["state"] in ("success", "failed"):
            return states
        assert time.time() - t0 < timeout_s, f"run {run_id} not finished after {timeout_s} s: {states}"
        time.sleep(5)


def task_log(af, token, run_id: str, task_id: str) -> list[dict]:
    """The task's log of its last try as the UI reads it: one dict per event (level, logger, event)."""
    status, ti = af._http("GET", f"{_run_path(run_id)}/taskInstances/{task_id}", token=token)
    assert status == 200, ti
    try_number = max(int(ti.get("try_number") or 1), 1)
    status, body = af._http("GET", f"{_run_path(run_id)}/taskInstances/{task_id}/logs/{try_number}"
                                   "?full_content=true", token=token)
    assert status == 200, body
    content = body.get("content")
    assert content, f"empty log for {task_id}: {body}"
    events = []
    for item in content:
        if isinstance(item, str):  # plain text lines (an older log format)
            try:
                item = json.loads(item)
            except ValueError:
                item = {"event": item, "level": "error" if " ERROR " in item else "info"}
        events.append(item)
    return events


def errors(events: list[dict]) -> list[dict]:
    return [e for e in events if str(e.get("level", "")).lower() in ERROR_LEVELS]


def _show(events: list[dict]) -> str:
    return "\n".join(f"{str(e.get('level', '')).upper():8} {e.get('logger', '')}: {str(e.get('event'))[:300]}"
                     for e in events)


def test_green_task_logs_have_no_error_lines_and_failures_do(airflow_instance, admin_token):
    af, token = airflow_instance, admin_token
    wait_for_dag(af, DAG, token)
    status, body = af._http("PATCH", f"/api/v2/dags/{DAG}", {"is_paused": False}, token)
    assert status == 200 and not body["is_paused"], body
    green = _trigger(af, token, GREEN)
    failing = _trigger(af, token, FAILING)

    # the failing run: validate_params refuses the missing file; its log says so at ERROR
    states = _await_end(af, token, failing, timeout_s=900)
    assert states["validate_params"] == "failed", states
    bad = task_log(af, token, failing, "validate_params")
    assert errors(bad), "a failed task's log has no ERROR line:\n" + _show(bad)
    assert any("does not exist" in json.dumps(e) for e in errors(bad)), _show(errors(bad))

    # the green run
    states = _await_end(af, token, green, timeout_s=2400)
    for t in GREEN_TASKS:
        assert states.get(t) == "success", states
    logs = {t: task_log(af, token, green, t) for t in GREEN_TASKS}
    found = {t: errors(ev) for t, ev in logs.items() if errors(ev)}
    assert not found, "ERROR lines in green tasks:\n" + "\n\n".join(f"[{t}]\n{_show(ev)}" for t, ev in found.items())
    assert not [e for ev in logs.values() for e in ev if e.get("logger") == "task.stderr"], \
        "raw stderr in a green task's log"
    # what ran is still visible, at its real level: progress with counts and rates, library warnings
    text = {t: _show(ev) for t, ev in logs.items()}
    assert "baseline measured:" in text["prep_checkpoint"] and "tokens/s" in text["prep_checkpoint"]
    assert "task items" in text["prep_checkpoint"]
    assert "calibration samples in" in text["quantize"] and "samples/s" in text["quantize"]
    assert "Compression lifecycle" in text["quantize"]  # llm-compressor's loguru, through logging
    assert "round 1 measured:" in text["validate"] and "held-out tokens" in text["validate"]
    # 4 items a set cannot show damage: the candidate is not measured on them, and the log says so
    assert "not measured for the candidate" in text["validate"]
    assert "weights and files compared" in text["validate"] and "blocks compared" in text["validate"]
    assert "WARNING" in text["quantize"] or "WARNING" in text["validate"], "no library warning kept at WARNING"
    print("\n[validate log of the green run]\n" + text["validate"])
