"""JSON-schema of the trigger form's fields, derived from the typed settings.

The DAG wraps each entry in an Airflow ``Param``; defaults, titles, descriptions
and bounds come from ``settings`` so they are defined exactly once.
"""

from __future__ import annotations

from annotated_types import Ge, Gt, Le, Lt

from .deployment.settings import DeploySettings
from .settings import (DEPLOY_FORM_FIELDS, GROUP_SIZES, METHODS, CalibrationSettings, DeployOptions, EvalSettings,
                       PipelineParams, QuantSettings, RemediationSettings, Tolerances, _SAFE_NAME)

# flat form name -> (settings model, field name)
FIELDS: dict[str, tuple[type, str]] = {
    "model_uri": (PipelineParams, "model_uri"),
    "run_name": (PipelineParams, "run_name"),
    "method": (QuantSettings, "method"),
    "bits": (QuantSettings, "bits"),
    "group_size": (QuantSettings, "group_size"),
    "symmetric": (QuantSettings, "symmetric"),
    "observer": (QuantSettings, "observer"),
    "calibration_samples": (CalibrationSettings, "num_samples"),
    "max_seq_length": (CalibrationSettings, "max_seq_length"),
    "calibration_dataset": (CalibrationSettings, "dataset_path"),
    "seed": (CalibrationSettings, "seed"),
    "ppl_max_tokens": (EvalSettings, "ppl_max_tokens"),
    "num_prompts": (EvalSettings, "num_prompts"),
    "max_new_tokens": (EvalSettings, "max_new_tokens"),
    "task_limit": (EvalSettings, "task_limit"),
    "sensitivity_layers": (EvalSettings, "sensitivity_layers"),
    "ppl_increase_pct": (Tolerances, "ppl_increase_pct"),
    "accuracy_drop_pct": (Tolerances, "accuracy_drop_pct"),
    "min_top1_agreement": (Tolerances, "min_top1_agreement"),
    "max_mean_kl": (Tolerances, "max_mean_kl"),
    "category_drop_pct": (Tolerances, "category_drop_pct"),
    "task_drop_pct": (Tolerances, "task_drop_pct"),
    "max_flip_rate": (Tolerances, "max_flip_rate"),
    "max_slice_kl": (Tolerances, "max_slice_kl"),
    "min_slice_top1": (Tolerances, "min_slice_top1"),
    "slice_ratio": (Tolerances, "slice_ratio"),
    "max_kl_excess": (Tolerances, "max_kl_excess"),
    "max_disagree_excess": (Tolerances, "max_disagree_excess"),
    "max_answer_flip_rate": (Tolerances, "max_answer_flip_rate"),
    "max_number_flip_rate": (Tolerances, "max_number_flip_rate"),
    "check_limits": (Tolerances, "check_limits"),
    "fail_fast": (Tolerances, "fail_fast"),
    "max_block_error": (Tolerances, "max_block_error"),
    "inconclusive": (Tolerances, "inconclusive"),
    "review_all": (Tolerances, "review_all"),
    "review_timeout_minutes": (Tolerances, "review_timeout_minutes"),
    "eval_domains_path": (EvalSettings, "eval_domains_path"),
    "tasks": (EvalSettings, "tasks"),
    "user_tasks_uri": (EvalSettings, "user_tasks_uri"),
    "chat_template": (EvalSettings, "chat_template"),
    "time_budget_s": (EvalSettings, "time_budget_s"),
    "remediation": (RemediationSettings, "enabled"),
    "remediation_attempts": (RemediationSettings, "max_attempts"),
    "deploy": (DeployOptions, "enabled"),
    **{name: (DeploySettings, name) for name in DEPLOY_FORM_FIELDS},
}
SECTIONS = {"model_uri": "Model", "run_name": "Model", "method": "Quantization", "bits": "Quantization",
            "group_size": "Quantization", "symmetric": "Quantization", "observer": "Quantization",
            "calibration_samples": "Calibration", "max_seq_length": "Calibration",
            "calibration_dataset": "Calibration", "seed": "Calibration", "ppl_max_tokens": "Evaluation",
            "num_prompts": "Evaluation", "max_new_tokens": "Evaluation", "ppl_increase_pct": "Gate tolerances",
            "accuracy_drop_pct": "Gate tolerances", "min_top1_agreement": "Gate tolerances",
            **{k: "Gate tolerances" for k in ("task_drop_pct", "max_flip_rate", "max_slice_kl", "min_slice_top1",
                                              "slice_ratio", "max_kl_excess", "max_disagree_excess",
                                              "max_answer_flip_rate", "max_number_flip_rate", "check_limits",
                                              "fail_fast", "max_block_error")},
            **{k: "Review" for k in ("inconclusive", "review_all", "review_timeout_minutes")},
            "eval_domains_path": "Evaluation", "tasks": "Evaluation", "user_tasks_uri": "Evaluation",
            "chat_template": "Evaluation", "time_budget_s": "Evaluation", "task_limit": "Evaluation", "sensitivity_layers": "Evaluation", "max_mean_kl": "Gate tolerances",
            "category_drop_pct": "Gate tolerances", "remediation": "Remediation",
            "remediation_attempts": "Remediation", "deploy": "Deployment",
            **{name: "Deployment" for name in DEPLOY_FORM_FIELDS}}
EXTRA = {
    "method": {"enum": list(METHODS)},
    "bits": {"enum": [4, 8]},
    "group_size": {"enum": list(GROUP_SIZES)},
    "observer": {"enum": ["minmax", "mse"]},
    "inconclusive": {"enum": ["fail", "review"]},
    "run_name": {"pattern": _SAFE_NAME.pattern},
}


def form_fields() -> dict[str, tuple[object, dict]]:
    """flat name -> (default, JSON-schema keywords for ``Param``)."""
    out = {}
    for name, (model, field) in FIELDS.items():
        info = model.model_fields[field]
        default = info.get_default(call_default_factory=True)
        if isinstance(default, tuple):
            default = list(default)
        ann = info.annotation
        if ann is bool:
            schema: dict = {"type": "boolean"}
        elif ann == dict[str, float]:
            schema = {"type": "object", "additionalProperties": {"type": "number", "minimum": 0}}
        elif ann is int:
            schema: dict = {"type": "integer"}
        elif ann == int | None:  # deployment limits: empty = the serving target's default
            schema = {"type": ["null", "integer"]}
        elif ann is float:
            schema = {"type": "number"}
        elif name in ("calibration_dataset", "eval_domains_path", "user_tasks_uri"):
            schema = {"type": ["null", "string"]}
        elif ann == tuple[str, ...]:  # free-form list (the user's task names join the built-in ones)
            schema = {"type": "array", "items": {"type": "string"}}
        else:
            schema = {"type": "string"}
        for m in info.metadata:
            if isinstance(m, Ge):
                schema["minimum"] = m.ge
            elif isinstance(m, Gt):
                schema["exclusiveMinimum"] = m.gt
            elif isinstance(m, Le):
                schema["maximum"] = m.le
            elif isinstance(m, Lt):
                schema["exclusiveMaximum"] = m.lt
        schema.update(EXTRA.get(name, {}))
        schema["title"] = info.title or name
        schema["description"] = info.description or info.title or name
        schema["section"] = SECTIONS[name]
        out[name] = (default, schema)
    return out


def conf_problem(conf: object) -> str | None:
    """Why a trigger's ``conf`` would be refused by ``validate_params``; None when it is accepted.

    The form's defaults are laid under ``conf`` exactly as Airflow does before the first task
    runs, so the API (and the UI form that posts to it) can refuse inconsistent combinations,
    such as fp8 with 4 bits, before a DAG run exists. Per-field bounds are Airflow's ``Param``
    schema; this adds the cross-field rules only the typed settings know.
    """
    if conf is None:
        conf = {}
    if not isinstance(conf, dict):
        return f"conf must be a JSON object, not {type(conf).__name__}"
    flat = {name: default for name, (default, _) in form_fields().items()}
    flat.update(conf)
    try:
        PipelineParams.from_flat(flat)
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        return _one_line(e)
    return None


def _one_line(e: ValueError) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):
        parts = []
        for err in errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "__root__")
            msg = str(err.get("msg", "")).removeprefix("Value error, ")
            parts.append(f"{where}: {msg}" if where else msg)
        return "; ".join(parts)
    return str(e)
