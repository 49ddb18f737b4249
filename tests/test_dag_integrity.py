"""DAG integrity: imports cleanly, wiring, queues, retries and params as designed."""

from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parents[1] / "dags"


@pytest.fixture(scope="module")
def dagbag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


@pytest.fixture(scope="module")
def dag(dagbag):
    return dagbag.dags["llm_quantization"]


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}
    assert "llm_quantization" in dagbag.dags


def test_queues(dag):
    queues = {t.task_id: t.queue for t in dag.tasks}
    assert queues["quantize"] == "gpu-a100"
    assert queues["quantize_fp8"] == "gpu-h100"
    assert queues["publish_approved"] == "serving"
    assert queues["deploy"] == "serving"
    # evaluations run on the GPU queue (baseline and candidate measured the same way)
    assert queues["prep_checkpoint"] == queues["validate"] == queues["remediate_1"] == "gpu-a100"
    assert queues["validate_params"] == queues["build_calibration"] == "default"


def test_retries_with_backoff(dag):
    for t in dag.tasks:
        if t.task_id in ("validate_params", "gate", "route_review", "review"):
            assert t.retries == 0, f"{t.task_id}: bad input is not transient"
        elif t.task_id == "deploy":
            assert t.retries == 1
        else:
            assert t.retries == 2 and t.retry_exponential_backoff, t.task_id


def test_wiring(dag):
    down = {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks}
    assert down["route"] == ["quantize", "quantize_fp8"]
    assert down["quantize"] == ["validate"] and down["quantize_fp8"] == ["validate"]
    assert down["validate"] == ["remediate_1"]
    assert down["remediate_1"] == ["remediate_2"] and down["remediate_2"] == ["route_review"]
    assert down["route_review"] == ["gate", "review"] and down["review"] == ["gate"]
    assert dag.get_task("gate").upstream_task_ids == {"route_review", "review"}
    assert dag.get_task("gate").downstream_task_ids == {"publish_approved"}
    assert dag.get_task("publish_approved").downstream_task_ids == {"deploy"}
    for t in ("remediate_1", "remediate_2", "route_review"):
        assert dag.get_task(t).trigger_rule == "none_failed", t
    # runs after route_review alone (review skipped) or after the review's approval
    assert dag.get_task("gate").trigger_rule == "none_failed_min_one_success"
    assert type(dag.get_task("gate")).__name__.startswith("_ShortCircuit")
    assert type(dag.get_task("route_review")).__name__.startswith("_Branch")


def test_review_is_an_approval_that_rejects_when_unanswered(dag):
    from airflow.providers.standard.operators.hitl import ApprovalOperator

    review = dag.get_task("review")
    assert isinstance(review, ApprovalOperator)
    assert review.options == ["Approve", "Reject"] and review.defaults == ["Reject"]
    assert not review.fail_on_reject  # a Reject skips the gate (and so publish and deploy), it is no failure
    assert review.trigger_rule == "all_success"
    # subject and body come from route_review's XCom, rendered when the review starts
    assert "route_review" in review.subject and "review_subject" in review.subject
    assert "route_review" in review.body and "review_body" in review.body


def test_review_takes_its_timeout_from_the_run(dag):
    """execute() sets response_timeout from the run's review_timeout_minutes before it parks."""
    from datetime import timedelta
    from unittest import mock

    from airflow.providers.standard.operators.hitl import HITLOperator

    review = dag.get_task("review")
    with mock.patch.object(HITLOperator, "execute", return_value=None) as parent:
        review.execute({"params": {"review_timeout_minutes": 7}})
    parent.assert_called_once()
    assert review.response_timeout == timedelta(minutes=7)
    assert dag.params.get_param("review_timeout_minutes").value == 60


def _review_answer(dag, option, monkeypatch, user=None):
    """Resume the review task as Airflow does after an answer; returns (outcome, recorded, pushed)."""
    from datetime import datetime, timezone
    from unittest import mock

    from quantpipe import pipeline

    recorded, pushed = [], {}
    monkeypatch.setattr(pipeline, "record_review", lambda params, result, record, run_id, store:
                        recorded.append((result, record, run_id)) or "file:///runs/r/review/review.json")
    result = {"verdict": "PASS", "passed": True, "failed_checks": [], "inconclusive_checks": [],
              "report_uri": "file:///r/report.json", "settings": {"tolerances": {"review_all": True}}}
    ti = mock.Mock(map_index=-1)
    ti.xcom_pull.return_value = [result, None, None]
    ti.xcom_push.side_effect = lambda key, value: pushed.__setitem__(key, value)
    review = dag.get_task("review")
    event = {"chosen_options": [option], "params_input": {}, "timedout": user is None,
             "responded_at": datetime(2026, 5, 1, tzinfo=timezone.utc), "responded_by_user": user}
    try:
        out = review.execute_complete({"ti": ti, "task": review, "run_id": "r"}, event)
    except Exception as e:  # noqa: BLE001
        out = e
    return out, recorded, pushed


def test_a_rejection_skips_the_gate_and_is_recorded_by_the_review(dag, monkeypatch):
    from airflow.sdk.exceptions import DownstreamTasksSkipped

    out, recorded, pushed = _review_answer(dag, "Reject", monkeypatch, user={"id": "admin", "name": "admin"})
    assert isinstance(out, DownstreamTasksSkipped) and "gate" in str(out.tasks)
    [(_, record, run_id)] = recorded
    assert record["approved"] is False and record["responded_by"]["name"] == "admin" and run_id == "r"
    assert pushed["rejection"]["record_uri"].endswith("/review/review.json")


def test_an_unanswered_review_is_a_recorded_rejection(dag, monkeypatch):
    out, recorded, _ = _review_answer(dag, "Reject", monkeypatch, user=None)
    assert type(out).__name__ == "DownstreamTasksSkipped"
    assert recorded[0][1]["timed_out"] is True and recorded[0][1]["responded_by"] is None


def test_an_approval_is_returned_for_the_gate_to_record(dag, monkeypatch):
    out, recorded, _ = _review_answer(dag, "Approve", monkeypatch, user={"id": "admin", "name": "admin"})
    assert out["chosen_options"] == ["Approve"] and out["responded_by_user"]["name"] == "admin"
    assert out["timedout"] is False and recorded == []


def test_params_render_as_a_form(dag):
    params = dag.params
    for name in ("model_uri", "method", "bits", "group_size", "calibration_samples", "max_seq_length",
                 "ppl_increase_pct", "accuracy_drop_pct"):
        p = params.get_param(name)
        assert p.schema.get("title") and p.description, name
    assert params.get_param("method").schema["enum"] == ["gptq", "awq", "fp8", "w8a8"]
    params.validate()  # defaults are valid


@pytest.mark.parametrize("field,value", [("method", "int3"), ("bits", 3), ("calibration_samples", 0),
                                         ("group_size", 100), ("run_name", "../x")])
def test_params_reject_bad_values(dag, field, value):
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError

    p = ParamsDict(dag.params)
    with pytest.raises(ParamValidationError, match=f"Invalid input for param {field}"):
        p[field] = value  # the form and the REST API validate the same way
        p.validate()
