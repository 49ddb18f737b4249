"""The trigger guard on a real api-server: inconsistent params are refused with the reason and
no DAG run is created; sound ones still create a run; anonymous callers still get Airflow's 401."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from .conftest import wait_for_dag

DAG = "llm_quantization"


def _runs(af, token) -> set[str]:
    status, body = af._http("GET", f"/api/v2/dags/{DAG}/dagRuns?limit=1000", token=token)
    assert status == 200, body
    return {r["dag_run_id"] for r in body["dag_runs"]}


@pytest.fixture(scope="module")
def paused(airflow_instance, admin_token):
    """The DAG paused, so the sound run created here stays queued and runs nothing."""
    wait_for_dag(airflow_instance, DAG, admin_token)
    status, body = airflow_instance._http("PATCH", f"/api/v2/dags/{DAG}", {"is_paused": True}, admin_token)
    assert status == 200 and body["is_paused"], body


@pytest.mark.parametrize("conf, needle", [
    ({"method": "fp8", "bits": 4}, "does not support 4-bit"),
    ({"method": "awq", "bits": 8, "group_size": 64}, "does not support 8-bit"),
    ({"run_name": "../../outside"}, "run_name"),
])
def test_inconsistent_params_are_refused_and_no_run_exists(airflow_instance, admin_token, paused, conf, needle):
    af = airflow_instance
    before = _runs(af, admin_token)
    status, body = af._http("POST", f"/api/v2/dags/{DAG}/dagRuns", {"logical_date": None, "conf": conf},
                            admin_token)
    assert status == 400 and needle in body["detail"], (status, body)
    assert _runs(af, admin_token) == before


def test_unknown_method_is_refused(airflow_instance, admin_token, paused):
    af = airflow_instance
    before = _runs(af, admin_token)
    status, body = af._http("POST", f"/api/v2/dags/{DAG}/dagRuns",
                            {"logical_date": None, "conf": {"method": "int3"}}, admin_token)
    assert status == 400 and "method" in str(body["detail"]), (status, body)
    assert _runs(af, admin_token) == before


def test_sound_params_create_a_run(airflow_instance, admin_token, paused):
    af = airflow_instance
    conf = {"method": "gptq", "bits": 4, "group_size": 64, "run_name": "guard-ok"}
    status, run = af._http("POST", f"/api/v2/dags/{DAG}/dagRuns", {"logical_date": None, "conf": conf}, admin_token)
    assert status in (200, 201), run
    assert run["conf"]["method"] == "gptq" and run["dag_run_id"] in _runs(af, admin_token)
    # the DAG is paused, so the run never started; remove it so a later unpause does not run it
    status, _ = af._http("DELETE", f"/api/v2/dags/{DAG}/dagRuns/{quote(run['dag_run_id'], safe='')}",
                         token=admin_token)
    assert status == 204


def test_anonymous_caller_gets_airflows_401_not_the_guards_answer(airflow_instance, admin_token, paused):
    status, body = airflow_instance._http("POST", f"/api/v2/dags/{DAG}/dagRuns",
                                          {"logical_date": None, "conf": {"method": "fp8", "bits": 4}})
    assert status == 401, (status, body)
