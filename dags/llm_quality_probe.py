"""
### Quality probe of the served model

Every 15 minutes: known prompts with expected answers are sent to the stable
endpoint; the score, latency and throughput are pushed to the Pushgateway
(`QUANTPIPE_MONITOR_PUSHGATEWAY_URL`). Prometheus fires
`QuantpipeQualityBelowThreshold` when the rolling 1h score drops below the
threshold. The second task reads the served model's p99 end-to-end latency from
Prometheus (`QUANTPIPE_MONITOR_PROMETHEUS_URL`) and fails above the SLO.

API key: Airflow Variable `quantpipe_vllm_api_key` (optional; never logged).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, dag, get_current_context, task

from quantpipe.logs import quiet_task

QUEUE_SERVING = "serving"


@dag(
    dag_id="llm_quality_probe",
    dag_display_name="LLM quality probe",
    description="Probe the live endpoint with known prompts, push the score, check the latency SLO",
    doc_md=__doc__,
    schedule=timedelta(minutes=15),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 1, "retry_delay": timedelta(minutes=1), "on_execute_callback": quiet_task},
    tags=["serving", "monitoring"],
    params={
        "deployment": Param("smollm2", type="string", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
                            title="Deployment (run name = served model name)"),
        "latency_slo_s": Param(10.0, type="number", exclusiveMinimum=0, title="p99 latency SLO (s)"),
    },
)
def llm_quality_probe():
    @task(queue=QUEUE_SERVING, task_display_name="Quality probe", execution_timeout=timedelta(minutes=10))
    def quality_probe() -> dict:
        from airflow.sdk import Variable

        from quantpipe.monitoring.probe import probe_and_push

        p = get_current_context()["params"]
        return probe_and_push(p["deployment"], api_key=Variable.get("quantpipe_vllm_api_key", default=None))

    @task(queue=QUEUE_SERVING, task_display_name="Latency SLO", retries=0)
    def latency_slo(probe: dict) -> dict:
        from quantpipe.monitoring.slo import check_latency_slo
        from quantpipe.monitoring.settings import MonitorSettings

        p = get_current_context()["params"]
        return check_latency_slo(p["deployment"], MonitorSettings.load({"latency_slo_s": p["latency_slo_s"]}))

    latency_slo(quality_probe())


llm_quality_probe()
