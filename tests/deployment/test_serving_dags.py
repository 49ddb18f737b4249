"""The rollback and quality-probe DAGs import cleanly, run on the serving queue and stay thin."""

from datetime import timedelta
from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parents[2] / "dags"


@pytest.fixture(scope="module")
def bag():
    from airflow.dag_processing.dagbag import DagBag

    bags = {f: DagBag(dag_folder=str(DAGS / f)) for f in ("llm_rollback.py", "llm_quality_probe.py")}
    for f, b in bags.items():
        assert b.import_errors == {}, f
    return {d: b.dags[d] for b in bags.values() for d in b.dags}


def test_rollback_dag(bag):
    dag = bag["llm_rollback"]
    assert type(dag.timetable).__name__ == "NullTimetable"  # manual only
    assert [t.queue for t in dag.tasks] == ["serving"]
    assert dag.params.get_param("deployment").value == "smollm2"


def test_probe_dag(bag):
    dag = bag["llm_quality_probe"]
    assert {t.task_id: t.queue for t in dag.tasks} == {"quality_probe": "serving", "latency_slo": "serving"}
    assert dag.get_task("quality_probe").downstream_task_ids == {"latency_slo"}
    assert type(dag.timetable).__name__ == "DeltaTriggerTimetable"  # every 15 min, not manual
    assert dag.params.get_param("latency_slo_s").value == 10.0


def test_dag_files_import_no_library_at_parse_time():
    """Serving DAGs parse fast: at the top only ``quantpipe.logs`` (the standard library alone at import)."""
    import ast
    import sys as _sys

    for f in ("llm_rollback.py", "llm_quality_probe.py"):
        top = [l for l in (DAGS / f).read_text().splitlines() if l.startswith(("import ", "from "))]
        assert not any("quantpipe" in l and l != "from quantpipe.logs import quiet_task" for l in top), f
    tree = ast.parse((DAGS.parent / "include" / "quantpipe" / "logs.py").read_text())
    mods = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    assert mods <= set(_sys.stdlib_module_names) | {"__future__"}, mods - set(_sys.stdlib_module_names)
