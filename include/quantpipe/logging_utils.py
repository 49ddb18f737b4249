"""Readable task logs: progress with counts and rates, and what to change when a stage fails.

    from quantpipe.logging_utils import Progress, failure_hint

    prog = Progress(log, "calibration batches", total=len(batches))
    for b in batches:
        ...
        prog.step()          # logs "calibration batches 8/32 (25%) 1.9/s, eta 12 s" at most every `every_s`
    prog.done()              # one-line result: "calibration batches: 32 in 16.8 s (1.9/s)"

    except Exception as e:
        log.error("quantize failed: %s", describe_failure(e, settings))
        raise

No Airflow imports; pure Python.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass


def _fmt_s(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """Counts units of work and logs count, share, rate and ETA at most every ``every_s`` seconds
    (and always on the last unit). ``clock`` is injectable for tests."""

    def __init__(self, log: logging.Logger, what: str, total: int | None = None, every_s: float = 10.0,
                 unit: str = "", clock=time.monotonic):
        self.log, self.what, self.total, self.every_s, self.unit, self.clock = log, what, total, every_s, unit, clock
        self.count = 0
        self.start = clock()
        self._last_log = self.start
        self.log.info("%s: starting%s", what, f" ({total} total)" if total is not None else "")

    @property
    def rate(self) -> float:
        elapsed = self.clock() - self.start
        return self.count / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate
        parts = [f"{self.what} {self.count}" + (f"/{self.total}" if self.total else "")]
        if self.total:
            parts.append(f"({100 * self.count / self.total:.0f}%)")
        parts.append(f"{rate:.3g}{self.unit}/s")
        if self.total and rate > 0 and self.count < self.total:
            parts.append(f"eta {_fmt_s((self.total - self.count) / rate)}")
        return " ".join(parts)

    def step(self, n: int = 1) -> None:
        self.count += n
        now = self.clock()
        if now - self._last_log >= self.every_s or (self.total and self.count >= self.total):
            self._last_log = now
            self.log.info("%s", self.line())

    def done(self, result: str = "") -> float:
        elapsed = self.clock() - self.start
        self.log.info("%s: %d in %s (%.3g%s/s)%s", self.what, self.count, _fmt_s(elapsed),
                      self.count / elapsed if elapsed > 0 else 0.0, self.unit, f"; {result}" if result else "")
        return elapsed


@dataclass(frozen=True)
class Hint:
    kind: str
    advice: str


# (kind, pattern over "ExceptionType: message", advice). First match wins.
_RULES: list[tuple[str, re.Pattern, str]] = [
    ("out_of_memory", re.compile(r"out of memory|OutOfMemoryError|CUDA error: out of memory|"
                                 r"DefaultCPUAllocator: can't allocate|Cannot allocate memory|MemoryError",
                                 re.I),
     "out of memory: lower calibration_samples (e.g. {half_samples}) or max_seq_length (e.g. {half_seq}), "
     "or offload to CPU (a larger worker or a queue with more GPU memory); a smaller ppl_max_tokens helps "
     "in validation"),
    ("killed", re.compile(r"SIGKILL|exit code -9|return code -9|Killed", re.I),
     "the process was killed (usually the OOM killer): lower calibration_samples / max_seq_length, or run "
     "on a worker with more memory"),
    ("no_accelerator", re.compile(r"Cannot access accelerator device|no accelerator|Found no NVIDIA driver", re.I),
     "no accelerator on this worker: route the task to the GPU queue, or use fp8 which runs on CPU"),
    ("timeout", re.compile(r"AirflowTaskTimeout|Timeout|timed out", re.I),
     "the task ran past its execution_timeout: fewer calibration_samples / ppl_max_tokens / task_limit, "
     "or a faster queue"),
    ("disk_full", re.compile(r"No space left on device", re.I),
     "the disk is full: clean old artifacts under QUANTPIPE_ARTIFACT_ROOT or enlarge the volume"),
    ("group_size", re.compile(r"group.?size|not divisible|divide", re.I),
     "group_size must divide every quantized layer's input width: pick one of 32, 64, 96, 192 for SmolLM2"),
    ("checkpoint", re.compile(r"safetensors|config\.json|checksum|sha256", re.I),
     "the checkpoint folder is incomplete or corrupt: re-upload it (safetensors + config.json + tokenizer)"),
    ("network", re.compile(r"Connection refused|Name or service not known|ConnectionError|HTTPSConnectionPool",
                           re.I),
     "a network call failed: workers run offline (HF_HUB_OFFLINE=1); use a local checkpoint path or check "
     "the artifact store's connection"),
]


def failure_hint(exc: BaseException | str, settings: dict | None = None) -> Hint | None:
    """What to change after a failure, or None when nothing specific is known.

    ``settings``: the run's flat params or nested settings; used to suggest concrete values."""
    text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    s = settings or {}
    samples = s.get("calibration_samples") or (s.get("calibration") or {}).get("num_samples") or 32
    seq = s.get("max_seq_length") or (s.get("calibration") or {}).get("max_seq_length") or 256
    for kind, pattern, advice in _RULES:
        if pattern.search(text):
            return Hint(kind, advice.format(half_samples=max(4, int(samples) // 2),
                                            half_seq=max(32, int(seq) // 2)))
    return None


def describe_failure(exc: BaseException, settings: dict | None = None, limit: int = 300) -> str:
    """One line: the error (shortened) and, when known, what to change."""
    msg = " ".join(str(exc).split())
    if len(msg) > limit:
        msg = msg[: limit - 3] + "..."
    hint = failure_hint(exc, settings)
    return f"{type(exc).__name__}: {msg}" + (f" -> {hint.advice}" if hint else "")
