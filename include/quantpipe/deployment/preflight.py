"""Pre-flight: refuse, with a clear reason, a deploy that cannot work.

Checks, in order: the validation report passed and is about this checkpoint; the
checkpoint's quantization scheme is one the serving target's vLLM build serves (the
target is detected on this worker unless configured: ``target.py``), with a WARNING
when it serves it only through a slow fallback; the configured context length fits
the model; memory and disk fit.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts import uri_to_path
from ..errors import PipelineError
from . import target as target_mod
from .settings import DeploySettings
from .target import TargetInfo

log = logging.getLogger(__name__)
GiB = 1024 ** 3


class PreflightError(PipelineError):
    """The deployment would not work; nothing was launched."""


# What each target serves, refuses and runs slowly: one table, in target.py (re-exported here).
SCHEME_SUPPORT = target_mod.SCHEME_SUPPORT
SLOW_FALLBACK = target_mod.SLOW_FALLBACK


@dataclass
class PreflightResult:
    scheme: str
    target: str
    target_reason: str
    weights_bytes: int
    kv_bytes_per_token: int
    memory_needed_bytes: int | None
    memory_available_bytes: int | None
    disk_free_bytes: int
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise PreflightError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PreflightError(f"{what} {path} is not valid JSON ({e})") from e


def _same_artifact(a: str, b: str) -> bool:
    if "://" in a.replace("file://", "") or "://" in b.replace("file://", ""):
        return a.rstrip("/") == b.rstrip("/")  # remote URIs name the artifact exactly
    return uri_to_path(a).resolve() == uri_to_path(b).resolve()


def check_report(validation: dict, approved_uri: str, artifacts) -> dict:
    """The validation passed, its report (read through ``artifacts``, a ``store.Store``) says so,
    and it validated this checkpoint."""
    if not validation.get("passed"):
        raise PreflightError(f"validation did not pass (failed checks: {validation.get('failed_checks')}); "
                             "refusing to deploy")
    if not validation.get("report_uri"):
        raise PreflightError("validation result has no report_uri")
    uri = validation["report_uri"]
    try:
        text = artifacts.read_text(uri)
    except FileNotFoundError:
        raise PreflightError(f"validation report {uri} does not exist") from None
    try:
        report = json.loads(text)
    except json.JSONDecodeError as e:
        raise PreflightError(f"validation report {uri} is not valid JSON ({e})") from e
    if report.get("passed") is not True:
        raise PreflightError(f"validation report {validation['report_uri']} says passed="
                             f"{report.get('passed')!r}; refusing to deploy")
    validated = (report.get("quantization") or {}).get("quantized_uri")
    if validated and not _same_artifact(validated, approved_uri):
        raise PreflightError(f"the report validated {validated}, not the approved model {approved_uri}")
    gens = (report.get("generations") or {}).get("quantized") or []
    if not gens or not all("prompt" in g and "token_ids" in g for g in gens):
        raise PreflightError(f"validation report {validation['report_uri']} holds no quantized greedy "
                             "generations for the health check")
    return report


def detect_scheme(config: dict) -> str:
    """Name the checkpoint's scheme as in the support table (BF16, FP8_DYNAMIC, W8A8, W4A16, ...)."""
    q = config.get("quantization_config")
    if not q:
        dt = str(config.get("torch_dtype") or config.get("dtype") or "float32")
        return {"bfloat16": "BF16", "float16": "FP16", "float32": "FP32"}.get(dt, dt.upper())
    method = q.get("quant_method")
    if method != "compressed-tensors":
        raise PreflightError(f"quantization_config.quant_method {method!r} is not compressed-tensors; this "
                             "pipeline deploys llm-compressor checkpoints only")
    groups = q.get("config_groups") or {}
    if not groups:
        raise PreflightError("compressed-tensors config has no config_groups")
    if q.get("kv_cache_scheme"):
        raise PreflightError("quantized KV cache (kv_cache_scheme) is not supported by this deployment")
    schemes = set()
    for name, g in groups.items():
        w, a = g.get("weights") or {}, g.get("input_activations")
        wt, wb = w.get("type"), w.get("num_bits")
        if a:
            at, ab = a.get("type"), a.get("num_bits")
            if wt == at == "float" and wb == ab == 8:
                schemes.add("FP8_DYNAMIC" if a.get("dynamic") else "FP8")
            elif wt == at == "int" and wb == ab == 8:
                schemes.add("W8A8")
            else:
                schemes.add(f"W{wb}A{ab}-{wt}/{at}")
        elif wt == "int" and wb in (4, 8):
            schemes.add(f"W{wb}A16" + ("" if w.get("symmetric", True) else "_ASYM"))
        else:
            schemes.add(f"W{wb}A16-{wt}")
    if len(schemes) != 1:
        raise PreflightError(f"mixed quantization schemes {sorted(schemes)} in one checkpoint are not supported")
    return schemes.pop()


def check_scheme(scheme: str, target: str | TargetInfo) -> str | None:
    """Refuse a scheme the target's vLLM build cannot serve (PreflightError with the reason); return the
    slow-fallback warning when it serves it only slowly, else None."""
    info = target if isinstance(target, TargetInfo) else \
        TargetInfo(name=target, source="configured", reason=f"target {target}")
    why = info.refusal(scheme)
    if why is not None:
        raise PreflightError(f"the {info.name} vLLM build cannot serve {scheme}: {why} (target {info.name}: "
                             f"{info.reason}). Quantize with one of {info.serves()} (method "
                             f"{target_mod.FAST_METHOD[info.name]} is fast here) or deploy to another target")
    slow = info.slow_fallback(scheme)
    if slow is not None:
        return (f"scheme {scheme} runs through a slow fallback on {info.name}: {slow}. Expect slow answers and "
                f"health-check timeouts; quantize with method {target_mod.FAST_METHOD[info.name]} to serve fast")
    return None


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def kv_bytes_per_token(config: dict, dtype_bytes: int = 2) -> int:
    layers = config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def model_max_len(model_dir: Path) -> int | None:
    """The checkpoint's max_position_embeddings (None when unreadable: pre-flight then says why)."""
    try:
        return json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None


def run_preflight(model_dir: Path, s: DeploySettings, *, mem_available: int | None = None,
                  cpu_flags: set[str] | None = None, gpus: int | None = None,
                  target: TargetInfo | None = None, reclaimable_bytes: int = 0) -> PreflightResult:
    """Checkpoint, scheme on the serving target, context length, memory and disk. Raises PreflightError.

    The target is ``s.serving_target()`` (detected unless configured); ``cpu_flags`` / ``gpus`` / ``target``
    replace the host's probes in tests. Limits left at None take the target's defaults. Logs the target,
    and a WARNING for a scheme served only through a slow fallback there. ``reclaimable_bytes``: memory the
    name's live server frees if the switch-over replaces it (drain-and-replace), counted as available."""
    info = target or s.serving_target(cpu_flags=cpu_flags, gpus=gpus)
    config = _read_json(model_dir / "config.json", "checkpoint config")
    s = s.resolved(info.name, config.get("max_position_embeddings"))
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise PreflightError(f"{model_dir} holds no *.safetensors weights")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (model_dir / name).is_file():
            raise PreflightError(f"{model_dir} lacks {name}; vLLM needs the tokenizer beside the weights")
    scheme = detect_scheme(config)
    log.info("serving target %s (%s: %s)", info.name, info.source, info.reason)
    if info.name == "cpu-avx512" and not info.avx512:
        raise PreflightError("target cpu-avx512 was configured but this CPU has no AVX512 (avx512f); "
                             "set QUANTPIPE_DEPLOY_TARGET=auto (or cpu-avx2)")
    warnings: list[str] = []
    slow = check_scheme(scheme, info)
    if slow:
        warnings.append(slow)
    notes: list[str] = []
    max_pos = config.get("max_position_embeddings")
    if max_pos and s.max_model_len > max_pos:
        raise PreflightError(f"max_model_len {s.max_model_len} exceeds the model's max_position_embeddings {max_pos}")
    if s.tensor_parallel_size > 1 and config["num_attention_heads"] % s.tensor_parallel_size:
        raise PreflightError(f"tensor_parallel_size {s.tensor_parallel_size} does not divide the "
                             f"{config['num_attention_heads']} attention heads")
    wbytes = sum(p.stat().st_size for p in weights)
    kv_tok = kv_bytes_per_token(config)
    need = avail = None
    if info.is_cpu:
        kv_space = int(s.cpu_kvcache_space_gib * GiB)
        if kv_space < kv_tok * s.max_model_len:
            raise PreflightError(
                f"KV cache {s.cpu_kvcache_space_gib} GiB holds {kv_space // kv_tok} tokens but max_model_len is "
                f"{s.max_model_len} ({kv_tok} bytes/token): raise cpu_kvcache_space_gib to at least "
                f"{kv_tok * s.max_model_len / GiB:.2f} or lower max_model_len")
        if kv_space < kv_tok * s.max_model_len * s.max_num_seqs:
            notes.append(f"KV cache fits {kv_space // (kv_tok * s.max_model_len)} full-length sequences, fewer than "
                         f"max_num_seqs={s.max_num_seqs}; requests will queue")
        need = wbytes + kv_space + int(s.cpu_runtime_overhead_gib * GiB)
        avail = _mem_available() if mem_available is None else mem_available
        if avail is not None and need > avail + reclaimable_bytes:
            freed = f" (+ {reclaimable_bytes / GiB:.1f} GiB the live server frees when replaced)" \
                if reclaimable_bytes else ""
            raise PreflightError(f"the server needs ~{need / GiB:.1f} GiB (weights {wbytes / GiB:.2f} + KV cache "
                                 f"{s.cpu_kvcache_space_gib} + runtime {s.cpu_runtime_overhead_gib}) but only "
                                 f"{avail / GiB:.1f} GiB of memory is available{freed}")
    else:
        log.info("pre-flight: GPU memory is checked by vLLM itself (gpu_memory_utilization %s)",
                 s.gpu_memory_utilization)
    s.state_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(s.state_dir).free
    if free < s.min_free_disk_gib * GiB:
        raise PreflightError(f"{s.state_dir} has {free / GiB:.2f} GiB free; {s.min_free_disk_gib} GiB is needed "
                             "for server logs and compile caches")
    for w in warnings + notes:
        log.warning("pre-flight: %s", w)
    return PreflightResult(scheme=scheme, target=info.name, target_reason=info.reason, weights_bytes=wbytes,
                           kv_bytes_per_token=kv_tok, memory_needed_bytes=need, memory_available_bytes=avail,
                           disk_free_bytes=free, notes=notes, warnings=warnings)
