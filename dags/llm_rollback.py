"""
### Roll back a served model

Brings the **previous** deployment record of a deployment (the run name of the
quantization run, e.g. `smollm2`) back up beside the live server, health-checks it
against its own validation outputs, switches the stable endpoint to it and stops
the current server. A failed launch or health check leaves the current model
serving. The new record points one step further back, so a second rollback goes
back again.

API key: Airflow Variable `quantpipe_vllm_api_key` (optional; never logged).
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import Param, dag, get_current_context, task

from quantpipe.logs import quiet_task

QUEUE_SERVING = "serving"


@dag(
    dag_id="llm_rollback",
    dag_display_name="LLM rollback",
    description="Restore the previous deployment of a served model behind its stable endpoint",
    doc_md=__doc__,
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"on_execute_callback": quiet_task},  # library output into logging at its real level
    tags=["serving", "vllm"],
    params={"deployment": Param("smollm2", type="string", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
                                title="Deployment (run name)")},
)
def llm_rollback():
    @task(queue=QUEUE_SERVING, retries=0, task_display_name="Roll back")
    def roll_back() -> dict:
        from airflow.sdk import Variable

        from quantpipe.deployment import rollback
        from quantpipe_storage import task_store  # plugins/ is on sys.path for every worker

        ctx = get_current_context()
        key = Variable.get("quantpipe_vllm_api_key", default=None)
        return rollback(ctx["params"]["deployment"], ctx["run_id"], artifacts=task_store(), api_key=key)

    roll_back()


llm_rollback()
