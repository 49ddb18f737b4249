"""
### LLM quantization pipeline

Takes a BF16/FP16 Hugging Face checkpoint to a validated, compressed-tensors
quantized checkpoint that vLLM serves as it is.

1. **prep_checkpoint** (queue `gpu-a100`): verify config and safetensors checksums, count
   parameters, baseline perplexity, greedy outputs and task accuracy (cached by checkpoint
   hash and device kind).
2. **build_calibration**: seeded sample of the corpus (or your JSONL), tokenized and
   validated (length, vocabulary range, diversity).
3. **quantize** (queue `gpu-a100`) or **quantize_fp8** (queue `gpu-h100`): llm-compressor
   `oneshot` with GPTQ, AWQ, FP8-dynamic or SmoothQuant+GPTQ W8A8; `lm_head` stays BF16.
4. **validate** (queue `gpu-a100`): first the exact checks of what the recipe must leave
   as it was (full-precision tensors row by row, the tokenizer, generation defaults and
   config served beside the weights); then perplexity, KL per domain and token class, known
   answers and task accuracy against the baseline, measured the same way (bf16 on a GPU
   worker, float32 on a CPU); one report (JSON + HTML). Every check has a verdict: PASS,
   FAIL or INCONCLUSIVE, with its interval. `fail_fast` (on) skips the task sets of a
   candidate that has already failed.
4c. **route_review** / **review**: a person approves or rejects the release in Airflow's
   Required Actions when the verdict is INCONCLUSIVE and `inconclusive` is `review`, or for
   PASS and INCONCLUSIVE when `review_all` is on; FAIL never goes to a person. Nobody
   answering within `review_timeout_minutes` is a Reject; a Reject stops the run.
   **gate** stops the run unless the verdict is PASS or a needed review approved; the review
   is recorded next to the reports (`runs/<run_id>/review/review.json`) and in the approval.
5. **publish_approved** (queue `serving`): records the approved model's URI.
6. **deploy** (queue `serving`): pre-flight, vLLM launched beside the live model, health
   check with real completions, switch of the stable endpoint `http://127.0.0.1:8000/v1`
   (model name = `run_name`), old server stopped; a failure leaves the old model serving.

Params: `method` and `bits` must agree (gptq 4/8, awq 4, fp8 8, w8a8 8); `group_size`
must divide the model's layer widths (576 and 1536 for the built-in SmolLM2: 32, 64,
96 or 192). Tolerances set the gate.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import Param, TriggerRule, dag, get_current_context, task

from quantpipe.form import form_fields
from quantpipe.logs import quiet_task

DEFAULT_ARGS = {
    "owner": "ml-platform",
    "retries": 2,
    "retry_delay": timedelta(seconds=20),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=10),
    # every task first routes library output (progress bars, notices) into logging at its real level
    "on_execute_callback": quiet_task,
}
QUEUE_QUANTIZE = "gpu-a100"
QUEUE_FP8 = "gpu-h100"
QUEUE_SERVING = "serving"


def _store():
    """This task's artifact store (local, or S3 when the deployment sets QUANTPIPE_REMOTE_ROOT)."""
    from quantpipe_storage import task_store  # plugins/ is on sys.path for every worker

    return task_store()


def _hf_token(model_uri: str) -> str | None:
    """For an hf:// model on a worker that reaches the hub: the password of the Airflow connection
    named by QUANTPIPE_HF_CONN (default ``quantpipe_hf``), when it exists. Never in XCom or logs."""
    if not model_uri.startswith("hf://"):
        return None
    import os

    from airflow.sdk import Connection

    try:
        return Connection.get(os.environ.get("QUANTPIPE_HF_CONN", "quantpipe_hf")).password or None
    except Exception:  # noqa: BLE001 - no such connection: public repos and offline caches need none
        return None


class ReleaseReview(ApprovalOperator):
    """Airflow's approval task (state awaiting_input until answered) with the run's own timeout
    (param ``review_timeout_minutes``); nobody answering is a Reject (``defaults``). A Reject
    skips the gate (and so publish and deploy), so the rejection is recorded here (store and
    XCom key ``rejection``); an approval is recorded by the gate."""

    def __init__(self, **kwargs) -> None:
        super().__init__(defaults=[self.REJECT], **kwargs)

    def execute(self, context):
        from quantpipe.settings import Tolerances

        minutes = context["params"].get("review_timeout_minutes") or Tolerances().review_timeout_minutes
        self.response_timeout = timedelta(minutes=int(minutes))
        return super().execute(context)

    def execute_complete(self, context, event):
        from airflow.sdk.exceptions import DownstreamTasksSkipped

        try:
            answer = super().execute_complete(context, event)
        except DownstreamTasksSkipped:
            # a Reject skips the gate by raising this, so its answer never reaches XCom: record it here
            from quantpipe.pipeline import latest_result, record_review
            from quantpipe.validation.review import review_record

            answer = {k: event.get(k) for k in ("chosen_options", "responded_by_user", "responded_at", "timedout")}
            result = latest_result(context["ti"].xcom_pull(task_ids=RESULT_TASKS))
            uri = record_review(result["settings"], result, review_record(result, answer), context["run_id"],
                                store=_store())
            context["ti"].xcom_push(key="rejection", value={**answer, "record_uri": uri})
            raise
        return {**answer, "timedout": bool(event.get("timedout"))}


@dag(
    dag_id="llm_quantization",
    dag_display_name="LLM quantization",
    description="Quantize a Hugging Face checkpoint with llm-compressor, validate it and gate its release",
    doc_md=__doc__,
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=2,
    default_args=DEFAULT_ARGS,
    tags=["quantization", "llm-compressor"],
    params={name: Param(default, **schema) for name, (default, schema) in form_fields().items()},
)
def llm_quantization():
    @task(retries=0, task_display_name="Validate params")
    def validate_params() -> dict:
        from quantpipe.pipeline import validate_params as run

        return run(dict(get_current_context()["params"]), store=_store())

    # model evaluations (baseline, validation) run where the GPUs are
    @task(queue=QUEUE_QUANTIZE, task_display_name="1. Checkpoint prep", execution_timeout=timedelta(hours=2))
    def prep_checkpoint(settings: dict) -> dict:
        from quantpipe.pipeline import prep_checkpoint as run

        return run(settings, store=_store(), hf_token=_hf_token(settings["model_uri"]))

    @task(task_display_name="2. Calibration data")
    def build_calibration(settings: dict, prep: dict) -> dict:
        from quantpipe.pipeline import build_calibration as run

        return run(settings, prep, store=_store())

    @task.branch(task_display_name="Route to a quantization queue")
    def route(settings: dict) -> str:
        return "quantize_fp8" if settings["quant"]["method"] == "fp8" else "quantize"

    @task(queue=QUEUE_QUANTIZE, task_display_name="3. Quantize", execution_timeout=timedelta(hours=6))
    def quantize(settings: dict, prep: dict, calib: dict) -> dict:
        from quantpipe.pipeline import run_quantization

        return run_quantization(settings, prep, calib, store=_store())

    @task(queue=QUEUE_FP8, task_display_name="3. Quantize (FP8)", execution_timeout=timedelta(hours=2))
    def quantize_fp8(settings: dict, prep: dict, calib: dict) -> dict:
        from quantpipe.pipeline import run_quantization

        return run_quantization(settings, prep, calib, store=_store())

    @task(queue=QUEUE_QUANTIZE, trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS, task_display_name="4. Validate",
          execution_timeout=timedelta(hours=6))
    def validate(settings: dict, prep: dict) -> dict:
        from quantpipe.pipeline import run_validation

        ctx = get_current_context()
        quant = _pick(ctx["ti"].xcom_pull(task_ids=["quantize", "quantize_fp8"]))
        return run_validation(settings, prep, quant, ctx["run_id"], store=_store())

    def _remediation(attempt: int):
        @task(task_id=f"remediate_{attempt}", task_display_name=f"4b. Remediation attempt {attempt}",
              queue=QUEUE_QUANTIZE, trigger_rule=TriggerRule.NONE_FAILED, execution_timeout=timedelta(hours=8))
        def remediate(settings: dict, prep: dict) -> dict:
            from airflow.sdk.exceptions import AirflowSkipException

            from quantpipe.pipeline import remediate as run

            ctx = get_current_context()
            results = ctx["ti"].xcom_pull(task_ids=RESULT_TASKS[:attempt])
            out = run(settings, prep, list(results or []), attempt, ctx["run_id"], store=_store())
            if out is None:
                raise AirflowSkipException(f"remediation attempt {attempt} not needed or not enabled")
            return out

        return remediate

    @task.branch(task_display_name="Route to a review", retries=0, trigger_rule=TriggerRule.NONE_FAILED)
    def route_review() -> list[str]:
        from quantpipe.pipeline import latest_result
        from quantpipe.validation.review import needs_review, review_body, review_subject

        ctx = get_current_context()
        result = latest_result(ctx["ti"].xcom_pull(task_ids=RESULT_TASKS))
        if not needs_review(result):
            return ["gate"]
        ctx["ti"].xcom_push(key="review_subject", value=review_subject(result, ctx["run_id"]))
        ctx["ti"].xcom_push(key="review_body", value=review_body(result))
        return ["review", "gate"]

    review = ReleaseReview(
        task_id="review", task_display_name="4c. Review by a person", retries=0,
        subject="{{ ti.xcom_pull(task_ids='route_review', key='review_subject') }}",
        body="{{ ti.xcom_pull(task_ids='route_review', key='review_body') }}",
    )

    @task.short_circuit(task_display_name="Gate", retries=0,
                        trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
    def gate() -> bool:
        from quantpipe.pipeline import latest_result, record_review
        from quantpipe.validation.review import gate_decision, review_record

        ctx = get_current_context()
        ti = ctx["ti"]
        result = latest_result(ti.xcom_pull(task_ids=RESULT_TASKS))
        answer = ti.xcom_pull(task_ids="review")  # None when the review was skipped
        record = None
        if answer:
            record = review_record(result, answer)
            record["record_uri"] = record_review(result["settings"], result, record, ctx["run_id"], store=_store())
            ti.xcom_push(key="review", value=record)  # publish_approved puts it in the approval record
        return gate_decision(result, record)

    @task(queue=QUEUE_SERVING, task_display_name="5. Publish approved model")
    def publish_approved(settings: dict) -> dict:
        from quantpipe.pipeline import latest_result, publish_approved as run

        ctx = get_current_context()
        final = latest_result(ctx["ti"].xcom_pull(task_ids=RESULT_TASKS))
        return run(final["settings"], final, ctx["run_id"], review=ctx["ti"].xcom_pull(task_ids="gate", key="review"),
                   store=_store())

    @task(queue=QUEUE_SERVING, task_display_name="6. Deploy on vLLM", retries=1,
          execution_timeout=timedelta(minutes=30))
    def deploy(settings: dict, approved: dict) -> dict:
        from airflow.sdk import Variable
        from airflow.sdk.exceptions import AirflowSkipException

        from quantpipe.pipeline import latest_result

        if not settings["deploy"]["enabled"]:
            raise AirflowSkipException("deployment disabled by the 'deploy' param")
        from quantpipe.deployment.api import deploy_approved

        ctx = get_current_context()
        final = latest_result(ctx["ti"].xcom_pull(task_ids=RESULT_TASKS))
        # the key comes from the Airflow Variable (masked in logs: its name contains "api_key"),
        # else from the worker's QUANTPIPE_VLLM_API_KEY; it never enters XCom
        api_key = Variable.get("quantpipe_vllm_api_key", default=None)
        return deploy_approved(final["settings"], approved, final, ctx["run_id"], artifacts=_store(), api_key=api_key,
                               settings=settings["deploy"]["overrides"])

    settings = validate_params()
    prep = prep_checkpoint(settings)
    calib = build_calibration(settings, prep)
    branch = route(settings)
    q_int = quantize(settings, prep, calib)
    q_fp8 = quantize_fp8(settings, prep, calib)
    branch >> [q_int, q_fp8]
    checked = validate(settings, prep)
    [q_int, q_fp8] >> checked
    r1 = _remediation(1)(settings, prep)
    r2 = _remediation(2)(settings, prep)
    checked >> r1 >> r2
    routed = route_review()
    ok = gate()
    r2 >> routed >> [review, ok]
    review >> ok
    approved = publish_approved(settings)
    ok >> approved
    deploy(settings, approved)


RESULT_TASKS = ["validate", "remediate_1", "remediate_2"]


def _pick(pulled) -> dict:
    """The one quantize branch that ran."""
    return next(q for q in (pulled or []) if q)


llm_quantization()
