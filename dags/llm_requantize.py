"""
### Re-quantization: on a schedule, and when a new checkpoint lands

Three DAGs; the decisions live in `quantpipe.scheduling` (unit-tested).

- **llm_requantize_scheduled** (cron, Sundays 03:00 UTC): re-runs `llm_quantization` for every
  entry of the configured list. The list is the Airflow Variable `quantpipe_requantize_models`
  (JSON list of the main DAG's params, e.g. `[{"model_uri": "builtin://smollm2-135m-instruct",
  "method": "fp8", "bits": 8, "run_name": "smollm2-fp8"}]`), else the YAML file named by env
  `QUANTPIPE_REQUANTIZE_CONFIG` (the plan fails when it names a missing file), else
  `include/requantize.yaml` beside the DAGs folder (single-machine checkout), else the built-in
  model with fp8. An entry is **skipped** when the checkpoint's content hash
  and its resolved settings equal those of its last *successful* run (state:
  `$QUANTPIPE_ARTIFACT_ROOT/scheduling/requantize_state.json`). Param `force` re-runs all.
- **llm_checkpoint_watcher** (every 10 minutes): hashes each checkpoint folder under the
  watched directory (Variable `quantpipe_checkpoint_watch_dir`, else env
  `QUANTPIPE_CHECKPOINT_WATCH_DIR`, else `$QUANTPIPE_ARTIFACT_ROOT/incoming-checkpoints`) and
  updates the Asset `quantpipe://checkpoints/incoming` when a folder is new or its content
  changed (the event's extra lists them). An upload step can update the same Asset.
- **llm_requantize_on_checkpoint** (scheduled on that Asset): triggers `llm_quantization` for
  each announced checkpoint with the methods in the Variable `quantpipe_requantize_methods`
  (JSON list, default `[{"method": "fp8", "bits": 8}]`), with the same skip rule.

Each triggered run waits (deferred, in the triggerer) and its outcome is recorded; only a
successful run makes a later identical entry skippable.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Asset, Param, TriggerRule, Variable, dag, get_current_context, task

from quantpipe.logs import quiet_task

MAIN_DAG = "llm_quantization"
MODELS_VARIABLE = "quantpipe_requantize_models"
METHODS_VARIABLE = "quantpipe_requantize_methods"
WATCH_VARIABLE = "quantpipe_checkpoint_watch_dir"
# single-machine default; images set QUANTPIPE_REQUANTIZE_CONFIG (quantpipe.scheduling.config_path)
YAML_PATH = Path(__file__).resolve().parents[1] / "include" / "requantize.yaml"
CHECKPOINTS_ASSET = Asset("quantpipe://checkpoints/incoming", group="quantpipe")
DEFAULT_ARGS = {"owner": "ml-platform", "retries": 1, "retry_delay": timedelta(seconds=30),
                "on_execute_callback": quiet_task}  # library output into logging at its real level


def _root() -> Path:
    from quantpipe.settings import Environment

    return Environment.from_env().artifact_root


def _plan(entries: list[dict], force: bool) -> list[dict]:
    """Decide per entry, log each decision, and return the triggers to run."""
    import logging

    from quantpipe.prep.sources import resolve_model_uri
    from quantpipe.scheduling import RequantState, plan
    from quantpipe_storage import task_store  # plugins/ is on sys.path for every worker

    log = logging.getLogger("quantpipe.requantize")
    store = task_store()  # s3:// models are read through the artifact store's connection
    state = RequantState.load(store.artifact_root)
    ctx = get_current_context()
    decisions = plan(entries, state, lambda uri: resolve_model_uri(uri, store.cache_dir, store), force=force)
    todo = []
    for d in decisions:
        log.info("%-48s %s: %s", d.key, "RUN " if d.run else "skip", d.reason)
        if d.run:
            run_id = f"requant__{d.key}__{ctx['run_id']}"[:250]
            state.mark_triggered(d.key, d.fingerprint, run_id)
            todo.append({"key": d.key, "fingerprint": d.fingerprint, "conf": d.entry, "run_id": run_id})
    state.save()
    log.info("plan: %d of %d entries to run, %d skipped (unchanged inputs)", len(todo), len(decisions),
             len(decisions) - len(todo))
    return todo


def _trigger_and_record(todo):
    """Mapped TriggerDagRunOperator (deferred wait) -> record the outcomes in the state file."""
    trigger = TriggerDagRunOperator.partial(
        task_id="trigger_quantization", trigger_dag_id=MAIN_DAG, wait_for_completion=True, deferrable=True,
        poke_interval=30, allowed_states=["success"], failed_states=["failed"], reset_dag_run=False,
        retries=0, execution_timeout=timedelta(hours=12),
    ).expand_kwargs(todo.map(lambda t: {"conf": t["conf"], "trigger_run_id": t["run_id"]}))

    @task(trigger_rule=TriggerRule.ALL_DONE, task_display_name="Record outcomes")
    def record(todo: list[dict]) -> dict:
        import logging

        from quantpipe.scheduling import RequantState

        log = logging.getLogger("quantpipe.requantize")
        ti = get_current_context()["ti"]
        state = RequantState.load(_root())
        out = {}
        for t in todo or []:
            try:
                run_state = ti.get_dagrun_state(MAIN_DAG, t["run_id"])
            except Exception as e:  # run never created (trigger failed before it)
                run_state = f"not found ({e.__class__.__name__})"
            state.mark_result(t["key"], t["fingerprint"], t["run_id"], str(run_state))
            out[t["key"]] = str(run_state)
            log.info("%s: run %s -> %s", t["key"], t["run_id"], run_state)
        state.save()
        failed = {k: v for k, v in out.items() if v != "success"}
        if failed:
            raise RuntimeError(f"re-quantization runs did not succeed: {failed}; they will be retried "
                               "at the next schedule (their inputs are not marked done)")
        return out

    done = record(todo)
    trigger >> done
    return done


@dag(
    dag_id="llm_requantize_scheduled",
    dag_display_name="LLM re-quantization (scheduled)",
    description="Re-run llm_quantization for a configured list of models; skip unchanged inputs",
    doc_md=__doc__,
    schedule="0 3 * * 0",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["quantization", "scheduling"],
    params={"force": Param(False, type="boolean", title="Force",
                           description="Re-run every entry even when its inputs are unchanged")},
)
def llm_requantize_scheduled():
    @task(task_display_name="Plan (skip unchanged)")
    def plan_entries() -> list[dict]:
        from quantpipe.scheduling import config_path, load_entries

        path, required = config_path(YAML_PATH)  # read on the worker, when the task runs
        entries = load_entries(Variable.get(MODELS_VARIABLE, default=None), path, required=required)
        return _plan(entries, bool(get_current_context()["params"].get("force")))

    _trigger_and_record(plan_entries())


@dag(
    dag_id="llm_checkpoint_watcher",
    dag_display_name="LLM checkpoint watcher",
    description="Announce new or changed checkpoint folders through the Asset quantpipe://checkpoints/incoming",
    doc_md=__doc__,
    schedule="*/10 * * * *",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={**DEFAULT_ARGS, "retries": 0},
    tags=["quantization", "scheduling"],
)
def llm_checkpoint_watcher():
    @task(outlets=[CHECKPOINTS_ASSET], task_display_name="Scan watched directory")
    def scan() -> dict:
        import logging

        from airflow.sdk.exceptions import AirflowSkipException

        from quantpipe.scheduling import scan_checkpoints

        log = logging.getLogger("quantpipe.requantize")
        root = _root()
        watch = Path(Variable.get(WATCH_VARIABLE, default=None)
                     or os.environ.get("QUANTPIPE_CHECKPOINT_WATCH_DIR") or root / "incoming-checkpoints")
        hashes, changed = scan_checkpoints(watch, root)
        log.info("scanned %s: %d checkpoint folders, %d new or changed %s", watch, len(hashes), len(changed),
                 changed)
        if not changed:
            raise AirflowSkipException(f"no new checkpoint under {watch}")  # a skip emits no asset event
        checkpoints = [{"name": n, "path": str(watch / n), "checkpoint_hash": hashes[n]} for n in changed]
        get_current_context()["outlet_events"][CHECKPOINTS_ASSET].extra = {"checkpoints": checkpoints}
        return {"checkpoints": checkpoints}

    scan()


@dag(
    dag_id="llm_requantize_on_checkpoint",
    dag_display_name="LLM re-quantization (new checkpoint)",
    description="Quantize checkpoints announced on quantpipe://checkpoints/incoming; skip unchanged inputs",
    doc_md=__doc__,
    schedule=[CHECKPOINTS_ASSET],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["quantization", "scheduling"],
)
def llm_requantize_on_checkpoint():
    @task(task_display_name="Plan new checkpoints")
    def plan_new() -> list[dict]:
        import json

        from quantpipe.scheduling import entries_for_checkpoints

        events = get_current_context()["triggering_asset_events"]
        checkpoints, seen = [], set()
        for ev in events.get(CHECKPOINTS_ASSET, []) if hasattr(events, "get") else events[CHECKPOINTS_ASSET]:
            for ck in (ev.extra or {}).get("checkpoints", []):
                if ck.get("name") not in seen:
                    seen.add(ck.get("name"))
                    checkpoints.append(ck)
        methods_raw = Variable.get(METHODS_VARIABLE, default=None)
        methods = json.loads(methods_raw) if methods_raw else None
        return _plan(entries_for_checkpoints(checkpoints, methods), force=False)

    _trigger_and_record(plan_new())


llm_requantize_scheduled()
llm_checkpoint_watcher()
llm_requantize_on_checkpoint()
