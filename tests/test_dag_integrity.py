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
        if t.task_id in ("validate_params", "gate"):
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
    assert down["remediate_1"] == ["remediate_2"] and down["remediate_2"] == ["gate"]
    assert dag.get_task("gate").downstream_task_ids == {"publish_approved"}
    assert dag.get_task("publish_approved").downstream_task_ids == {"deploy"}
    for t in ("remediate_1", "remediate_2", "gate"):
        assert dag.get_task(t).trigger_rule == "none_failed", t
    assert type(dag.get_task("gate")).__name__.startswith("_ShortCircuit")


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
