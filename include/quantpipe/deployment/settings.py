"""Typed settings for stage 5 (deployment); each default is defined here once.

Values come from, in order: explicit overrides (a dict the caller passes), then
environment variables ``QUANTPIPE_DEPLOY_<FIELD>`` (upper case), then the defaults
below. Which vLLM executable and environment runs is configuration
(``QUANTPIPE_VLLM_CMD``), never code. Where state lives is configuration too:
``state_dir`` is ``QUANTPIPE_DEPLOY_STATE_DIR``, else ``$QUANTPIPE_CACHE/serving`` (the worker's
cache folder, as ``quantpipe.settings.Environment`` reads it), never a path inside the installed
package (which an image puts in site-packages).
"""

from __future__ import annotations

import ipaddress
import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import PipelineError
from .target import TargetInfo, resolve_target

REPO = Path(__file__).resolve().parents[3]
ENV_PREFIX = "QUANTPIPE_DEPLOY_"
VLLM_CMD_ENV = "QUANTPIPE_VLLM_CMD"
DEFAULT_VLLM_CMD = f"{REPO / '.venv-serving' / 'bin' / 'python'} {REPO / 'scripts' / 'vllm_cpu.py'}"
CACHE_ENV = "QUANTPIPE_CACHE"  # the worker's cache folder (quantpipe.settings.Environment.from_env)
STATE_SUBDIR = "serving"

Target = Literal["auto", "cpu-avx2", "cpu-avx512", "cuda"]
SwitchMode = Literal["auto", "beside", "drain-and-replace"]

# Limits a field left at None takes on each kind of target: the one place these defaults live.
# CPU: a 2-core CPU serves a few sequences at a time; eager mode (graph capture costs 40-60 s of startup there).
# CUDA: a serving GPU: CUDA graphs on (no --enforce-eager), vLLM's own GPU-sized batch limits.
TARGET_DEFAULTS: dict[str, dict] = {
    "cpu": {"max_model_len": 2048, "max_num_seqs": 8, "max_num_batched_tokens": 2048, "enforce_eager": True},
    "cuda": {"max_model_len": 8192, "max_num_seqs": 256, "max_num_batched_tokens": 8192, "enforce_eager": False},
}
LIMIT_FIELDS = tuple(TARGET_DEFAULTS["cpu"])


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$QUANTPIPE_CACHE/serving``, read when settings are made (not at import). Without
    QUANTPIPE_CACHE: the checkout's ``.cache/serving``, the same single-machine fallback as
    ``Environment.from_env``'s cache folder."""
    env = os.environ if environ is None else environ
    cache = env.get(CACHE_ENV)
    return (Path(cache) if cache else REPO / ".cache") / STATE_SUBDIR


def target_kind(target: str) -> str:
    """``cpu`` or ``cuda``: which column of TARGET_DEFAULTS a target uses."""
    return "cuda" if target == "cuda" else "cpu"


class DeploySettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    vllm_cmd: str = Field(DEFAULT_VLLM_CMD, title="vLLM command",
                          description="A command that behaves like the `vllm` CLI; `serve MODEL ...` is appended. "
                                      f"Env {VLLM_CMD_ENV}. Default: the CPU wrapper in .venv-serving")
    target: Target = Field("auto", title="Serving target",
                           description="auto (default): detected on the serving worker - cuda when an NVIDIA GPU "
                                       "is visible (and the command is not the CPU build), cpu-avx512 when "
                                       "/proc/cpuinfo has avx512f, else cpu-avx2 (quantpipe.deployment.target). "
                                       "A value here overrides the detection. Decides which quantization "
                                       "schemes pre-flight accepts and which it warns about")
    host: str = Field("127.0.0.1", title="Bind address of the vLLM servers and the stable endpoint")
    endpoint_port: int = Field(8000, ge=1024, le=65535, title="Stable endpoint port (what clients call)")
    backend_ports: tuple[int, int] = Field((8100, 8199), title="Port range for vLLM servers behind the endpoint")
    max_model_len: int | None = Field(None, ge=64, le=131072, title="Max model length (tokens)",
                                      description="None: the target's default (TARGET_DEFAULTS), capped at the "
                                                  "model's max_position_embeddings")
    max_num_seqs: int | None = Field(None, ge=1, le=1024, title="Max concurrent sequences",
                                     description="None: the target's default (TARGET_DEFAULTS)")
    max_num_batched_tokens: int | None = Field(None, ge=64, le=262144, title="Max batched tokens per step",
                                               description="None: the target's default (TARGET_DEFAULTS)")
    enable_chunked_prefill: bool = Field(True, title="Chunked prefill")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, title="GPU memory utilisation (cuda only)")
    cpu_kvcache_space_gib: float = Field(1.0, gt=0, le=512, title="KV cache size on CPU (GiB, VLLM_CPU_KVCACHE_SPACE)")
    cpu_runtime_overhead_gib: float = Field(2.5, ge=0, title="Server RSS beside weights and KV cache (GiB)",
                                            description="Measured ~3 GB RSS for a 135M model on vllm-cpu 0.32")
    min_free_disk_gib: float = Field(1.0, ge=0, title="Free disk needed for logs and compile caches (GiB)")
    tensor_parallel_size: int = Field(1, ge=1, le=64, title="Tensor parallel size")
    enforce_eager: bool | None = Field(None, title="Eager mode (no graph compilation)",
                                       description="None: the target's default (TARGET_DEFAULTS): eager on CPU "
                                                   "(40-60 s startup), CUDA graphs on a GPU")
    dtype: str = Field("auto", title="dtype passed to vLLM")
    api_key_env: str = Field("QUANTPIPE_VLLM_API_KEY", title="Env var holding the API key (never logged)")
    state_dir: Path = Field(default_factory=default_state_dir, title="Logs, proxy state and vLLM caches",
                            description="Env QUANTPIPE_DEPLOY_STATE_DIR. Default: $QUANTPIPE_CACHE/serving")
    startup_timeout_s: float = Field(300, gt=0, title="Seconds to wait for /health after launch")
    stop_timeout_s: float = Field(30, gt=0, title="Seconds between SIGTERM and SIGKILL")
    switchover: SwitchMode = Field("auto", title="Switch-over mode",
                                   description="auto (default): beside the old server when free memory (read from "
                                               "the device) holds both, else drain-and-replace "
                                               "(switchover.py, placement.py). beside / drain-and-replace force one")
    drain_timeout_s: float = Field(120, ge=0, title="Seconds to wait for requests in flight before a server stops",
                                   description="The endpoint stops routing new requests to the old server first")
    switchover_margin_gib: float = Field(1.0, ge=0, title="Memory kept free when starting beside (GiB)",
                                         description="beside only when the new server's need plus this margin fits "
                                                     "the free memory (host RAM on CPU, the GPU's free memory)")
    request_timeout_s: float = Field(120, gt=0, title="Timeout of one health/bench request")
    health_num_prompts: int = Field(3, ge=1, le=64, title="Validation prompts replayed by the health check")
    health_max_tokens: int = Field(16, ge=1, le=1024, title="Greedy tokens compared per prompt")
    health_min_agreement: float = Field(0.75, ge=0, le=1, title="Teacher-forced agreement needed",
                                        description="Share of validated continuation positions where vLLM's own "
                                                    "top-1 token is the validated one (measured here: FP8 0.92, "
                                                    "BF16 ~1.0, a wrong-config model 0.03)")
    health_min_prefix_tokens: int = Field(0, ge=0, title="Greedy tokens every prompt must reproduce exactly",
                                          description="0 = off: measured FP8 on vLLM vs transformers flips even the "
                                                      "first token of a near-tie prompt")

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
        except ValueError as e:
            raise ValueError(f"host {v!r} must be an IP address (127.0.0.1 keeps the server local)") from e
        return v

    @field_validator("vllm_cmd")
    @classmethod
    def _cmd(cls, v: str) -> str:
        if not shlex.split(v):
            raise ValueError("vllm_cmd is empty")
        return v

    @model_validator(mode="after")
    def _ports(self) -> "DeploySettings":
        lo, hi = self.backend_ports
        if not (1024 <= lo <= hi <= 65535):
            raise ValueError(f"backend_ports {self.backend_ports} must be an increasing range within 1024-65535")
        if lo <= self.endpoint_port <= hi:
            raise ValueError(f"endpoint_port {self.endpoint_port} lies inside backend_ports {self.backend_ports}")
        # limits left at None are checked once resolved for a target (``resolved``)
        if None not in (self.max_num_batched_tokens, self.max_num_seqs) and \
                self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs")
        if None not in (self.max_num_batched_tokens, self.max_model_len) and not self.enable_chunked_prefill \
                and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"without chunked prefill max_num_batched_tokens ({self.max_num_batched_tokens}) "
                             f"must be >= max_model_len ({self.max_model_len})")
        return self

    @property
    def command(self) -> list[str]:
        return shlex.split(self.vllm_cmd)

    def serving_target(self, **probes) -> TargetInfo:
        """The target this worker serves on: ``target`` when set, else detected (``probes`` replace the
        host's /proc/cpuinfo flags and GPU count in tests: cpu_flags=, cpuinfo=, gpus=)."""
        return resolve_target(self.target, self.vllm_cmd, **probes)

    @property
    def is_resolved(self) -> bool:
        return all(getattr(self, f) is not None for f in LIMIT_FIELDS)

    def resolved(self, target: str, max_position_embeddings: int | None = None) -> "DeploySettings":
        """These settings with every limit left at None set to ``target``'s default (TARGET_DEFAULTS), a
        defaulted max_model_len capped at the model's ``max_position_embeddings``; values set explicitly
        (override or env) are kept (pre-flight refuses one the model cannot take). Idempotent."""
        if self.is_resolved:
            return self
        defaults = dict(TARGET_DEFAULTS[target_kind(target)])
        if max_position_embeddings:
            defaults["max_model_len"] = min(defaults["max_model_len"], max_position_embeddings)
        values = self.model_dump()
        values.update({f: defaults[f] for f in LIMIT_FIELDS if values[f] is None})
        try:
            return type(self)(**values)
        except ValueError as e:
            raise PipelineError(f"invalid deployment settings for target {target}: {e}") from e

    @classmethod
    def load(cls, overrides: dict | None = None, environ: dict | None = None) -> "DeploySettings":
        """Defaults <- QUANTPIPE_DEPLOY_* / QUANTPIPE_VLLM_CMD env vars <- overrides."""
        env = os.environ if environ is None else environ
        values: dict = {}
        for name in cls.model_fields:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None and raw != "":
                values[name] = tuple(int(x) for x in raw.replace("-", ",").split(",")) \
                    if name == "backend_ports" else raw
        if env.get(VLLM_CMD_ENV):
            values["vllm_cmd"] = env[VLLM_CMD_ENV]
        values.setdefault("state_dir", default_state_dir(env))  # from the same environment as the rest
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        try:
            return cls(**values)
        except ValueError as e:
            raise PipelineError(f"invalid deployment settings: {e}") from e
