"""A person for the grey zone, on a real Airflow (tests/live_airflow.py: api-server, scheduler,
dag-processor, triggerer on 127.0.0.1, LocalExecutor): a cheap FP8 run with ``review_all``
stops at the ``review`` task in state ``awaiting_input``, listed as a required action; answered
through the REST API as ``admin``:

- Approve: the gate opens, publish_approved records the approval, and approved.json names the
  responder; review.json beside the reports says who approved and when.
- Reject: the gate, publish and deploy are skipped; no approved.json; review.json keeps the
  rejection.

A FAIL verdict never goes to a person; if this cheap run comes out FAIL the test says so
(nothing is loosened to make it reach the review).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from quantpipe.pipeline import safe_run_id

from ..live_airflow import wait_for_dag

DAG = "llm_quantization"
CONF = {"method": "fp8", "bits": 8, "ppl_max_tokens": 256, "num_prompts": 2, "max_new_tokens": 4,
        "task_limit": 0, "sensitivity_layers": 0, "remediation": False, "deploy": False, "review_all": True}
FINISHED = ("success", "failed", "skipped", "upstream_failed", "removed")
SETTLE_S = 20  # see _await_review

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def _run_path(run_id: str) -> str:
    return f"/api/v2/dags/{DAG}/dagRuns/{quote(run_id, safe='')}"


def _states(af, token, run_id) -> dict[str, str | None]:
    status, body = af._http("GET", f"{_run_path(run_id)}/taskInstances?limit=100", token=token)
    assert status == 200, body
    return {t["task_id"]: t["state"] for t in body["task_instances"]}


def _xcom(af, token, run_id, task_id, key="return_value"):
    status, body = af._http("GET", f"{_run_path(run_id)}/taskInstances/{task_id}/xcomEntries/{key}",
                            token=token)
    if status != 200:
        return None
    value = body.get("value")
    return json.loads(value) if isinstance(value, str) else value


def _trigger(af, token, run_name: str) -> str:
    wait_for_dag(af, DAG, token)
    status, body = af._http("PATCH", f"/api/v2/dags/{DAG}", {"is_paused": False}, token)
    assert status == 200 and not body["is_paused"], body
    status, run = af._http("POST", f"/api/v2/dags/{DAG}/dagRuns",
                           {"logical_date": None, "conf": {**CONF, "run_name": run_name}}, token)
    assert status in (200, 201), run
    return run["dag_run_id"]


def _await_review(af, token, run_id, timeout_s: int = 2400) -> dict:
    """Wait until the review task is parked awaiting input; returns its HITL detail."""
    t0, last = time.time(), None
    while True:
        states = _states(af, token, run_id)
        if states != last:
            print(f"  {time.time() - t0:5.0f} s {run_id}: "
                  + ", ".join(f"{k}={v}" for k, v in states.items() if v))
            last = states
        if states.get("review") == "awaiting_input":
            break
        failed = {k: v for k, v in states.items() if v in ("failed", "upstream_failed")}
        assert not failed, f"the run failed before its review: {failed}"
        if states.get("review") in FINISHED or states.get("route_review") == "success" and \
                states.get("review") == "skipped":
            result = _xcom(af, token, run_id, "validate")
            pytest.fail(f"the run did not go to review: verdict {result and result.get('verdict')}, "
                        f"failed {result and result.get('failed_checks')}; report "
                        f"{result and result.get('report_html_uri')} (states {states})")
        assert time.time() - t0 < timeout_s, f"no review awaiting input after {timeout_s} s: {states}"
        time.sleep(5)
    print(f"  review awaiting input after {time.time() - t0:.0f} s")
    # Airflow 3.3.2 race (scheduler + LocalExecutor): the workload that parked the task reports
    # "success" to the executor a few seconds after the park (its supervisor's exit). An answer
    # that resumes the task before the scheduler has seen that event gets the resumed try marked
    # FAILED ("state changed externally", same try_number). A person never answers that fast;
    # the test waits the way a person would.
    time.sleep(SETTLE_S)
    status, detail = af._http("GET", f"{_run_path(run_id)}/taskInstances/review/-1/hitlDetails", token=token)
    assert status == 200, detail
    return detail


def _required_actions(af, token) -> list[dict]:
    """What the UI's Required Actions page lists: HITL details without a response, any DAG and run."""
    status, body = af._http("GET", "/api/v2/dags/~/dagRuns/~/hitlDetails?response_received=false&limit=100",
                            token=token)
    assert status == 200, body
    return body["hitl_details"]


def _answer(af, token, run_id, option: str) -> dict:
    status, body = af._http("PATCH", f"{_run_path(run_id)}/taskInstances/review/-1/hitlDetails",
                            {"chosen_options": [option]}, token)
    assert status == 200, (status, body)
    return body


def _await_end(af, token, run_id, timeout_s: int = 600) -> tuple[str, dict]:
    t0 = time.time()
    while True:
        status, run = af._http("GET", _run_path(run_id), token=token)
        assert status == 200, run
        if run["state"] in ("success", "failed"):
            return run["state"], _states(af, token, run_id)
        assert time.time() - t0 < timeout_s, f"run still {run['state']}: {_states(af, token, run_id)}"
        time.sleep(3)


def _check_review_request(af, token, run_id, detail: dict) -> str:
    result = _xcom(af, token, run_id, "validate")
    verdict = result["verdict"]
    print(f"  verdict {verdict}; failed {result['failed_checks']}; inconclusive {result['inconclusive_checks']}")
    assert verdict in ("PASS", "INCONCLUSIVE")
    assert detail["options"] == ["Approve", "Reject"] and detail["defaults"] == ["Reject"]
    assert not detail["response_received"] and detail["chosen_options"] is None
    assert verdict in detail["subject"] and run_id in detail["subject"]
    assert f"**Verdict: {verdict}**" in detail["body"] and result["report_html_uri"] in detail["body"]
    for name in result["inconclusive_checks"]:
        assert f"`{name}`" in detail["body"]
    listed = [d for d in _required_actions(af, token)
              if d["task_instance"]["dag_run_id"] == run_id and d["task_instance"]["task_id"] == "review"]
    assert len(listed) == 1, "the review is not listed among the required actions"
    assert listed[0]["task_instance"]["state"] == "awaiting_input"
    return verdict


def _review_json(af, run_id) -> dict:
    path = Path(af.artifact_root) / "runs" / safe_run_id(run_id) / "review" / "review.json"
    assert path.is_file(), f"no review record at {path}"
    return json.loads(path.read_text())


def test_approved_review_opens_the_gate_and_the_approval_names_the_responder(airflow_instance, admin_token):
    af, token = airflow_instance, admin_token
    t0 = time.time()
    run_id = _trigger(af, token, "review-approve")
    detail = _await_review(af, token, run_id)
    verdict = _check_review_request(af, token, run_id, detail)
    t_review = time.time() - t0

    answered = _answer(af, token, run_id, "Approve")
    assert answered["responded_by"]["name"] == "admin" and answered["chosen_options"] == ["Approve"]
    state, states = _await_end(af, token, run_id)
    print(f"  approve run: review after {t_review:.0f} s, end {time.time() - t0:.0f} s: {state} {states}")
    assert state == "success", states
    assert states["review"] == "success" and states["gate"] == "success"
    assert states["publish_approved"] == "success" and states["deploy"] == "skipped"
    assert _xcom(af, token, run_id, "gate") is True

    rid = safe_run_id(run_id)
    approved = json.loads((Path(af.artifact_root) / "runs" / rid / "approved" / "approved.json").read_text())
    assert approved["review"]["approved"] is True and approved["review"]["chosen_options"] == ["Approve"]
    assert approved["review"]["responded_by"]["name"] == "admin" and approved["review"]["responded_at"]
    assert approved["review"]["verdict"] == verdict == approved["verdict"]
    assert approved["review"]["record_uri"].endswith(f"/runs/{rid}/review/review.json")
    review = _review_json(af, run_id)
    assert review["approved"] is True and review["responded_by"]["name"] == "admin"
    assert review["report_uri"] == approved["report_uri"] and not review["timed_out"]
    assert not any(d["task_instance"]["dag_run_id"] == run_id for d in _required_actions(af, token))


def test_rejected_review_skips_gate_and_publish(airflow_instance, admin_token):
    af, token = airflow_instance, admin_token
    t0 = time.time()
    run_id = _trigger(af, token, "review-reject")
    detail = _await_review(af, token, run_id)
    verdict = _check_review_request(af, token, run_id, detail)
    t_review = time.time() - t0

    _answer(af, token, run_id, "Reject")
    state, states = _await_end(af, token, run_id)
    print(f"  reject run: review after {t_review:.0f} s, end {time.time() - t0:.0f} s: {state} {states}")
    assert states["review"] == "success"  # a Reject is an answer, not a failure
    assert states["gate"] == "skipped" and states["publish_approved"] == "skipped"
    assert states["deploy"] == "skipped"
    assert state == "success", states
    rid = safe_run_id(run_id)
    assert not (Path(af.artifact_root) / "runs" / rid / "approved").exists()
    review = _review_json(af, run_id)
    assert review["approved"] is False and review["chosen_options"] == ["Reject"]
    assert review["responded_by"]["name"] == "admin" and review["verdict"] == verdict
