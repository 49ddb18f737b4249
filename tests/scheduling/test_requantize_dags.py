"""dags/llm_requantize.py parses, and its three DAGs are wired as documented."""

from __future__ import annotations

from pathlib import Path

import pytest

DAG_FILE = Path(__file__).resolve().parents[2] / "dags" / "llm_requantize.py"


@pytest.fixture(scope="module")
def dags():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAG_FILE))
    assert bag.import_errors == {}
    return bag.dags


def test_scheduled_dag_triggers_the_main_dag_and_records(dags):
    d = dags["llm_requantize_scheduled"]
    assert "0 3 * * 0" in repr(d.timetable)
    trig = d.get_task("trigger_quantization")
    assert trig.partial_kwargs.get("trigger_dag_id", getattr(trig, "trigger_dag_id", None)) in (None,
                                                                                              "llm_quantization")
    assert d.get_task("plan_entries").downstream_task_ids == {"trigger_quantization", "record"}
    assert d.get_task("record").trigger_rule == "all_done"
    assert "force" in d.params


def test_watcher_updates_the_asset_that_schedules_the_checkpoint_dag(dags):
    scan = dags["llm_checkpoint_watcher"].get_task("scan")
    assert [o.uri for o in scan.outlets] == ["quantpipe://checkpoints/incoming"]
    consumer = dags["llm_requantize_on_checkpoint"]
    assert "quantpipe://checkpoints/incoming" in str(consumer.timetable.asset_condition)
    assert {"plan_new", "trigger_quantization", "record"} == set(consumer.task_ids)
