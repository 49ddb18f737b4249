"""Typed settings for every stage, validated at the edge.

This module is the one place that defines each default. The DAG builds its
trigger-form ``Param``s from these models, so the form, the API and the library
agree on names, bounds and defaults.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Method = Literal["gptq", "awq", "fp8", "w8a8"]
METHODS: tuple[str, ...] = ("gptq", "awq", "fp8", "w8a8")
BITS_BY_METHOD: dict[str, tuple[int, ...]] = {"gptq": (4, 8), "awq": (4,), "fp8": (8,), "w8a8": (8,)}
GROUP_SIZES: tuple[int, ...] = (32, 64, 96, 128, 192)
GROUPED_METHODS = ("gptq", "awq")
DEFAULT_MODEL_URI = "builtin://smollm2-135m-instruct"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


MODEL_SCHEMES = ("builtin://", "file://", "s3://", "hf://")
HF_ID = re.compile(r"^hf://([A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,95})(?:@([\w./-]{1,255}))?$")


def check_model_uri(uri: str) -> str:
    """The URI if its form is one the product reads (checked at the form, before any run exists)."""
    if "://" not in uri:
        return uri
    if not uri.startswith(MODEL_SCHEMES):
        raise ValueError(f"model_uri {uri!r}: scheme must be one of {', '.join(MODEL_SCHEMES)} or a plain path")
    if uri.startswith("hf://") and not HF_ID.match(uri):
        raise ValueError(f"model_uri {uri!r}: a hub id is hf://org/name or hf://org/name@revision")
    if uri.startswith("s3://") and len([x for x in uri[5:].split("/") if x]) < 2:
        raise ValueError(f"model_uri {uri!r}: name the checkpoint's folder, s3://bucket/prefix/")
    return uri


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QuantSettings(_Frozen):
    """What to quantize and how. ``scheme`` is derived from method and bits."""

    method: Method = Field("fp8", title="Quantization method",
                           description="gptq (W4A16/W8A16), awq (W4A16 asymmetric), fp8 (FP8 dynamic), "
                                       "w8a8 (SmoothQuant + GPTQ int8)")
    bits: int = Field(8, title="Weight bits", description="4 or 8 for gptq, 4 for awq, 8 for fp8 and w8a8")
    group_size: int = Field(64, title="Group size",
                            description="Weights per quantization group (gptq/awq). Must divide every "
                                        "quantized layer's input width; checked against the checkpoint.")
    symmetric: bool = Field(False, title="Symmetric 4-bit weights (gptq)",
                            description="Off (default): 4-bit GPTQ weights get a zero point per group "
                                        "(W4A16_ASYM), which keeps skewed groups accurate; on: W4A16")
    observer: Literal["minmax", "mse"] = Field("mse", title="Weight scale search (gptq)",
                                               description="mse (default): each group's scale and zero "
                                                           "point minimize the rounding error; minmax: "
                                                           "span the group's range")
    ignore: tuple[str, ...] = Field(("lm_head",), title="Modules kept unquantized")
    dampening_frac: float = Field(0.01, gt=0, lt=1, title="GPTQ dampening fraction")
    smoothing_strength: float = Field(0.8, gt=0, lt=1, title="SmoothQuant strength (w8a8)")

    @model_validator(mode="after")
    def _check_combination(self) -> "QuantSettings":
        allowed = BITS_BY_METHOD[self.method]
        if self.bits not in allowed:
            raise ValueError(f"method {self.method!r} does not support {self.bits}-bit weights; "
                             f"choose bits in {list(allowed)}")
        if self.method in GROUPED_METHODS and self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size {self.group_size} is not one of {list(GROUP_SIZES)}")
        return self

    @property
    def scheme(self) -> str:
        if (self.method, self.bits) == ("gptq", 4) and not self.symmetric:
            return "W4A16_ASYM"
        return {("gptq", 4): "W4A16", ("gptq", 8): "W8A16", ("awq", 4): "W4A16_ASYM",
                ("fp8", 8): "FP8_DYNAMIC", ("w8a8", 8): "W8A8"}[(self.method, self.bits)]

    @property
    def uses_groups(self) -> bool:
        return self.method in GROUPED_METHODS

    @property
    def needs_calibration(self) -> bool:
        return self.method != "fp8"


class CalibrationSettings(_Frozen):
    num_samples: int = Field(32, ge=4, le=4096, title="Calibration samples")
    max_seq_length: int = Field(256, ge=32, le=8192, title="Calibration sequence length (tokens)")
    min_tokens: int = Field(32, ge=1, title="Shortest accepted sample (tokens)")
    seed: int = Field(0, ge=0, title="Sampling seed")
    dataset_path: str | None = Field(None, title="Domain JSONL (optional)",
                                     description="A JSONL file with a 'text' field; empty uses the shipped corpus")
    min_distinct_token_ratio: float = Field(0.2, gt=0, le=1, title="Diversity floor",
                                            description="Distinct token ids / total tokens across the set")

    @model_validator(mode="after")
    def _check_lengths(self) -> "CalibrationSettings":
        if self.min_tokens > self.max_seq_length:
            raise ValueError(f"min_tokens {self.min_tokens} exceeds max_seq_length {self.max_seq_length}")
        return self


class EvalSettings(_Frozen):
    """How baseline and quantized models are measured (identical for both)."""

    ppl_max_tokens: int = Field(1536, ge=256, le=1_000_000, title="Held-out tokens per domain",
                                description="Tokens of each held-out domain (prose, math, code, structured, "
                                            "chat, yours) measured for perplexity, KL and agreement")
    ppl_window: int = Field(512, ge=64, le=8192, title="Perplexity window (tokens)")
    domains: tuple[str, ...] = Field(("prose", "math", "code", "structured", "chat"), title="Held-out domains",
                                     description="Built-in domains measured per slice")
    eval_domains_path: str | None = Field(None, title="Your held-out domains (JSONL, optional)",
                                          description="A JSONL file with 'text' and optional 'domain' fields; "
                                                      "each domain becomes slice checks of its own")
    answer_tokens: int = Field(4, ge=1, le=64, title="Tokens per short answer (answer-flip prompts)")
    num_prompts: int = Field(8, ge=1, le=256, title="Greedy consistency prompts")
    max_new_tokens: int = Field(32, ge=1, le=1024, title="Greedy tokens per prompt")
    task_limit: int = Field(100, ge=0, le=5000, title="Items per task set",
                            description="Items of each lm-eval task set scored (0 skips task accuracy)")
    tasks: tuple[str, ...] = Field((), title="Task sets (categories)",
                                   description="Empty: the worker's suite (GPU: PIQA, SIQA, OpenBookQA, ASDiv, "
                                               "MMLU 5-shot, GSM8K, HumanEval; CPU: the first four) and every "
                                               "task in your task folder. Or name them: qp_piqa, qp_siqa, "
                                               "qp_openbookqa, qp_asdiv, qp_mmlu, qp_gsm8k, qp_humaneval, yours")
    user_tasks_uri: str | None = Field(None, title="Your task folder (lm-eval YAMLs, optional)",
                                       description="A folder (local path or s3://) of lm-eval task YAMLs with their "
                                                   "JSON/CSV data files (paths relative to the YAML); each task is "
                                                   "scored on baseline and candidate with its own tolerance "
                                                   "(category_drop_pct)")
    chat_template: bool = Field(False, title="Prompts through the model's chat template",
                                description="lm-eval tasks are prompted through the model's chat template (few-shot "
                                            "examples as turns) when it has one")
    sensitivity_layers: int = Field(8, ge=0, le=512, title="Layers probed for loss impact")
    time_budget_s: int = Field(1800, ge=0, le=86400, title="Measurement time budget (s)",
                               description="When a verdict is inconclusive, validation measures more (twice "
                                           "the held-out tokens or task items, up to two more rounds) while "
                                           "the next round fits in this budget")


class _WorkerEnv(_Frozen):
    """A worker's settings, read field by field from ``ENV_PREFIX + FIELD`` variables
    (unknown fields are refused)."""

    ENV_PREFIX: ClassVar[str] = ""

    @classmethod
    def from_env(cls):
        prefix = cls.ENV_PREFIX
        vals = {k[len(prefix):].lower(): v for k, v in os.environ.items() if k.startswith(prefix)}
        try:
            return cls(**vals)
        except ValueError as e:
            raise ValueError(f"bad {prefix}* environment: {e}") from e


class EvalEngine(_WorkerEnv):
    """How this worker runs evaluations: its hardware, not a run's params. From the
    environment (``QUANTPIPE_EVAL_DEVICE``, ``QUANTPIPE_EVAL_PPL_BATCH``, ...), so a GPU
    worker image sets them once. ``auto`` uses CUDA in bfloat16 when a GPU is visible and
    the CPU in float32 otherwise; the baseline is cached per device kind, so baseline and
    candidate are always measured the same way."""

    ENV_PREFIX: ClassVar[str] = "QUANTPIPE_EVAL_"

    device: Literal["auto", "cpu", "cuda"] = "auto"
    ppl_batch: int = Field(4, ge=1, le=256, description="perplexity windows per forward (GPU)")
    token_budget: int = Field(32768, ge=256, description="tokens per log-likelihood forward (GPU)")
    cpu_token_budget: int = Field(2048, ge=64, description="tokens per log-likelihood forward (CPU)")
    pack_width: int = Field(256, ge=0, le=8192, description="positions per packed log-likelihood row "
                                                             "(several short requests share a row); 0: one per row")
    gen_batch: int = Field(256, ge=1, le=4096, description="prompts decoded together")
    cuda_graph: bool = Field(True, description="replay each decode step as a CUDA graph")
    overlap: bool = Field(True, description="GPU: generation and lm-eval run beside perplexity")
    shard: Literal["auto", "never", "always"] = Field(
        "auto", description="split the decoder layers over the worker's GPUs: auto when the model does not "
                            "fit the first GPU, always (over every visible GPU), never")


class QuantEngine(_WorkerEnv):
    """How this worker runs quantization: its hardware, not a run's params. From the
    environment (``QUANTPIPE_QUANT_PROCS``, ``QUANTPIPE_QUANT_OFFLOAD_DIR``, ...), set once by a
    worker image. ``procs`` 0 runs one process per visible GPU (llm-compressor's distributed
    oneshot under torchrun) for the methods that calibrate, one process otherwise."""

    ENV_PREFIX: ClassVar[str] = "QUANTPIPE_QUANT_"

    procs: int = Field(0, ge=0, le=64, description="quantization processes; 0: one per visible GPU")
    offload_dir: Path | None = Field(None, description="folder for weights that do not fit host memory; "
                                                       "default: <tmp>/quantpipe-offload")
    timeout_s: float = Field(6 * 3600, gt=0, description="limit for a distributed oneshot")


class Tolerances(_Frozen):
    ppl_increase_pct: float = Field(10.0, ge=0, title="Perplexity tolerance (%)",
                                    description="Largest accepted perplexity increase over the baseline")
    accuracy_drop_pct: float = Field(5.0, ge=0, le=100, title="Accuracy tolerance (points)",
                                     description="Largest accepted drop in accuracy (next-token accuracy on "
                                                 "held-out text), in percentage points")
    min_top1_agreement: float = Field(0.8, ge=0, le=1, title="Top-1 agreement floor",
                                      description="Share of held-out positions where the quantized model "
                                                  "predicts the same next token as the baseline")
    max_mean_kl: float = Field(0.25, ge=0, title="KL divergence ceiling (nats)",
                               description="Largest accepted mean KL(baseline || quantized) of next-token "
                                           "distributions on held-out text")
    task_drop_pct: float = Field(10.0, ge=0, le=100, title="Task accuracy tolerance (points)",
                                 description="Largest accepted accuracy drop on a task set, in points (the "
                                             "report states the smallest drop each set could detect)")
    category_drop_pct: dict[str, float] = Field(default_factory=dict, title="Per-category tolerances (points)",
                                                description="Override task_drop_pct for a task set, e.g. "
                                                            '{"qp_asdiv": 10}')
    max_flip_rate: float = Field(0.2, ge=0, le=1, title="Confident-flip ceiling",
                                 description="Largest accepted share of the baseline's confident predictions "
                                             "(top-1 probability >= 0.5) that the quantized model changes, "
                                             "overall and in every slice")
    max_slice_kl: float = Field(0.4, ge=0, title="KL ceiling per slice (nats)",
                                description="Largest accepted mean KL in any one domain or token class")
    min_slice_top1: float = Field(0.7, ge=0, le=1, title="Top-1 agreement floor per slice",
                                  description="Smallest accepted top-1 agreement in any one domain or token class")
    slice_ratio: float = Field(2.0, ge=1, le=100, title="Concentration ratio",
                               description="A slice may carry this many times the mean KL (and top-1 "
                                           "disagreement) of the positions it is compared with before its "
                                           "excess counts as concentrated damage (sound methods: at most 1.6x)")
    max_kl_excess: float = Field(0.02, ge=0, title="KL excess ceiling per slice (nats)",
                                 description="Largest accepted mean KL of a slice beyond slice_ratio x that of "
                                             "the other positions of the same text (other domains for a domain)")
    max_disagree_excess: float = Field(0.05, ge=0, le=1, title="Disagreement excess ceiling per slice",
                                       description="Largest accepted top-1 disagreement of a slice beyond "
                                                   "slice_ratio x that of the other positions")
    max_block_error: float = Field(0.4, ge=0, title="Block error ceiling",
                                   description="Largest accepted relative error of any decoder block's residual "
                                               "update, the block run on the candidate's own input with the "
                                               "candidate's and with the baseline's tensors (sound FP8/W8A8 "
                                               "measured at most 0.08, 4-bit GPTQ/AWQ 0.21; a zeroed block 1.0)")
    max_answer_flip_rate: float = Field(0.25, ge=0, le=1, title="Known-fact loss ceiling",
                                        description="Largest accepted share of the short factual answers the "
                                                    "baseline knows (right, first token p >= 0.5) that the "
                                                    "quantized model changes")
    max_number_flip_rate: float = Field(0.55, ge=0, le=1, title="Known-sum loss ceiling",
                                        description="The same for small sums, products and differences (few-shot): "
                                                    "a sound 4-bit GPTQ of the small model loses 15 of 49 on an "
                                                    "AVX512 host and 18 of 49 on an AVX2 one (its rounding "
                                                    "follows the host's float sums), FP8/W8A8 3-4; rotated "
                                                    "digit rows lose 48 of 49")
    check_limits: dict[str, float] = Field(default_factory=dict, title="Per-check limits",
                                           description='Override one slice check\'s limit by name, e.g. '
                                                       '{"kl:domain:code": 0.5, "top1:class:digits": 0.6}')
    fail_fast: bool = Field(True, title="Stop measuring a failed candidate",
                            description="When the weights, files, held-out text or answers have already failed "
                                        "the candidate with confidence, its task sets (the costliest part) are "
                                        "not measured; the report lists them as not measured and why. A FAIL "
                                        "never goes to a person, so this cannot change a verdict")
    inconclusive: Literal["fail", "review"] = Field("fail", title="Inconclusive verdicts",
                                                    description="fail (default): a check the data cannot decide "
                                                                "blocks the release; review: a person decides "
                                                                "(Required Actions in the Airflow UI)")
    review_all: bool = Field(False, title="Review every verdict",
                             description="A person approves or rejects every release, whatever the checks say")
    review_timeout_minutes: int = Field(60, ge=1, le=10080, title="Review timeout (minutes)",
                                        description="Unanswered reviews are rejected after this long")


class RemediationSettings(_Frozen):
    enabled: bool = Field(True, title="Auto-remediation",
                          description="When the gate fails, re-quantize with a safer recipe and validate again")
    max_attempts: int = Field(2, ge=0, le=2, title="Remediation attempts")
    keep_sensitive_layers: int = Field(6, ge=0, le=64, title="Sensitive layers kept unquantized per attempt")


DEPLOY_FORM_FIELDS = ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "enable_chunked_prefill",
                      "gpu_memory_utilization", "tensor_parallel_size")


class DeployOptions(_Frozen):
    enabled: bool = Field(True, title="Deploy after the gate",
                          description="Serve the approved model on vLLM behind the stable endpoint")
    overrides: dict[str, int | float | bool | str] = Field(default_factory=dict, title="vLLM settings",
                                                          description="Overrides of DeploySettings")

    @model_validator(mode="after")
    def _check(self) -> "DeployOptions":
        from .deployment.settings import DeploySettings

        DeploySettings.load(self.overrides, environ={})  # bad values are refused here, before any work
        return self


class PipelineParams(_Frozen):
    """Everything a run is triggered with: the DAG's params map onto this one model."""

    model_uri: str = Field(DEFAULT_MODEL_URI, title="Model",
                           description="builtin://smollm2-135m-instruct; a path or file:// URI of a Hugging "
                                       "Face checkpoint folder (safetensors); s3://bucket/prefix/ in the "
                                       "artifact store's S3; or hf://org/name[@revision] (the worker's hub "
                                       "cache when offline)")
    run_name: str = Field("smollm2", title="Run name", description="Letters, digits, . _ - (no paths)")
    quant: QuantSettings = QuantSettings()
    calibration: CalibrationSettings = CalibrationSettings()
    evaluation: EvalSettings = EvalSettings()
    tolerances: Tolerances = Tolerances()
    remediation: RemediationSettings = RemediationSettings()
    deploy: DeployOptions = Field(default_factory=DeployOptions)

    @field_validator("run_name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not _SAFE_NAME.match(v) or ".." in v:
            raise ValueError(f"run_name {v!r} must match {_SAFE_NAME.pattern} and contain no '..'")
        return v

    @field_validator("model_uri")
    @classmethod
    def _uri_scheme(cls, v: str) -> str:
        return check_model_uri(v)

    @classmethod
    def from_flat(cls, flat: dict) -> "PipelineParams":
        """Build from the DAG's flat params (the trigger form's fields)."""
        f = dict(flat)
        def pick(keys: tuple[str, ...]) -> dict:
            return {k: f[k] for k in keys if k in f and f[k] is not None and f[k] != ""}
        return cls(
            **pick(("model_uri", "run_name")),
            quant=QuantSettings(**pick(("method", "bits", "group_size", "symmetric", "observer"))),
            calibration=CalibrationSettings(**{
                **({"num_samples": f["calibration_samples"]} if f.get("calibration_samples") else {}),
                **({"max_seq_length": f["max_seq_length"]} if f.get("max_seq_length") else {}),
                **({"dataset_path": f["calibration_dataset"]} if f.get("calibration_dataset") else {}),
                **pick(("seed",)),
            }),
            evaluation=EvalSettings(**pick(("ppl_max_tokens", "num_prompts", "max_new_tokens", "task_limit",
                                            "sensitivity_layers", "eval_domains_path",
                                            "time_budget_s", "tasks", "user_tasks_uri", "chat_template"))),
            tolerances=Tolerances(**pick(("ppl_increase_pct", "accuracy_drop_pct", "min_top1_agreement",
                                          "max_mean_kl", "task_drop_pct", "category_drop_pct", "max_flip_rate", "max_slice_kl",
                                          "min_slice_top1", "slice_ratio", "max_kl_excess", "max_disagree_excess", "max_answer_flip_rate",
                                          "max_number_flip_rate", "check_limits", "fail_fast", "max_block_error",
                                          "inconclusive", "review_all", "review_timeout_minutes"))),
            remediation=RemediationSettings(**{
                **({"enabled": f["remediation"]} if f.get("remediation") is not None else {}),
                **({"max_attempts": f["remediation_attempts"]} if f.get("remediation_attempts") is not None
                   else {}),
            }),
            deploy=DeployOptions(**({"enabled": f["deploy"]} if f.get("deploy") is not None else {}),
                                 overrides={k: f[k] for k in DEPLOY_FORM_FIELDS if f.get(k) is not None}),
        )


class Environment(_Frozen):
    """Where things live on this worker; from environment variables, not params."""

    artifact_root: Path
    cache_dir: Path

    @classmethod
    def from_env(cls) -> "Environment":
        repo = Path(__file__).resolve().parents[2]
        cache = Path(os.environ.get("QUANTPIPE_CACHE", repo / ".cache"))
        root = Path(os.environ.get("QUANTPIPE_ARTIFACT_ROOT", repo / ".artifacts"))
        return cls(artifact_root=root, cache_dir=cache)
