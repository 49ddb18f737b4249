"""Where the new server of a switch-over starts: beside the old one, or in its place.

``decide_switchover`` is a pure function of what was read from the device:

- ``fresh``: nothing serves this name; the new server starts, nothing is replaced;
- ``beside``: the new server starts next to the old one (which keeps serving until the new
  one passed its health check), because the memory it needs is free: on a CPU target the
  host's available memory holds the new server's estimated need plus a margin; on CUDA a
  set of ``tensor_parallel_size`` GPUs (another GPU of the node, or the old server's own
  when it has room) each has ``gpu_memory_utilization`` x its total free, plus the margin
  (vLLM refuses to start with less);
- ``drain-and-replace``: both do not fit (or the memory could not be read): the endpoint
  stops routing new requests to the old server, requests in flight finish (up to
  ``drain_timeout_s``), the old server stops, the new one starts on the memory it freed; if
  the new one fails its health check the old model is started again (switchover.py).

The readers (``read_cpu_memory``, ``read_gpu_memory``) are the only impure part: host
``/proc/meminfo``, ``nvidia-smi``, or ``torch.cuda.mem_get_info`` run in the serving
environment's Python when nvidia-smi is missing. Stdlib only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

GiB = 1024 ** 3
MODES = ("fresh", "beside", "drain-and-replace")


@dataclass(frozen=True)
class GpuMemory:
    index: int  # nvidia-smi's index (PCI bus order); launched servers get CUDA_DEVICE_ORDER=PCI_BUS_ID
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class MemoryReading:
    """What was read from the device; ``error`` when it could not be read."""

    kind: str  # cpu | cuda
    source: str
    available_bytes: int | None = None  # cpu: MemAvailable
    gpus: tuple[GpuMemory, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class SwitchPlan:
    mode: str  # one of MODES
    reason: str
    devices: tuple[int, ...] | None = None  # cuda: the GPUs the new server is pinned to (None: not pinned)
    need_bytes: int | None = None
    memory: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["devices"] = list(self.devices) if self.devices is not None else None
        return d


def _gib(n: int | float | None) -> str:
    return "?" if n is None else f"{n / GiB:.1f} GiB"


def _reading_dict(r: MemoryReading | None) -> dict:
    if r is None:
        return {}
    return {"kind": r.kind, "source": r.source, "available_bytes": r.available_bytes, "error": r.error,
            "gpus": [asdict(g) for g in r.gpus]}


def decide_switchover(*, target: str, old_alive: bool, reading: MemoryReading | None, need_bytes: int | None,
                      configured: str = "auto", old_devices: tuple[int, ...] | list[int] | None = None,
                      tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                      margin_bytes: int = GiB) -> SwitchPlan:
    """Beside or drain-and-replace, and why. Pure: every input is a value, nothing is read here."""
    mem = _reading_dict(reading)
    cuda = target == "cuda"
    old_dev = tuple(old_devices) if old_devices is not None else None
    if not old_alive:
        return SwitchPlan("fresh", "no live server serves this name: nothing to replace", None, need_bytes, mem)
    if configured == "beside":
        return SwitchPlan("beside", "configured: switchover=beside (memory not checked)", None, need_bytes, mem)
    if configured == "drain-and-replace":
        return SwitchPlan("drain-and-replace", "configured: switchover=drain-and-replace", old_dev, need_bytes, mem)
    if reading is None or reading.error:
        why = reading.error if reading is not None else "nothing was read"
        return SwitchPlan("drain-and-replace", f"free memory could not be read ({why}); replacing is the safe choice",
                          old_dev, need_bytes, mem)
    if not cuda:
        avail = reading.available_bytes
        if need_bytes is None:
            return SwitchPlan("drain-and-replace", "the new server's memory need is unknown; replacing is the safe "
                              "choice", None, need_bytes, mem)
        if avail is None:
            return SwitchPlan("drain-and-replace", f"available host memory unknown ({reading.source})", None,
                              need_bytes, mem)
        if need_bytes + margin_bytes <= avail:
            return SwitchPlan("beside", f"host memory: the new server needs ~{_gib(need_bytes)} + margin "
                              f"{_gib(margin_bytes)}, {_gib(avail)} available ({reading.source})", None, need_bytes,
                              mem)
        return SwitchPlan("drain-and-replace", f"host memory: the new server needs ~{_gib(need_bytes)} + margin "
                          f"{_gib(margin_bytes)} but only {_gib(avail)} is available beside the old server "
                          f"({reading.source})", None, need_bytes, mem)
    # cuda: vLLM takes gpu_memory_utilization x total on each of tensor_parallel_size GPUs and refuses to start
    # when that much is not free
    if not reading.gpus:
        return SwitchPlan("drain-and-replace", f"no GPU memory reading ({reading.source})", old_dev, need_bytes, mem)

    def fits(g: GpuMemory) -> bool:
        want = gpu_memory_utilization * g.total_bytes
        if need_bytes is not None:
            want = max(want, need_bytes)
        return g.free_bytes >= want + margin_bytes

    # another GPU of the node first (the old server's keep their memory until it stops), then the old one's own
    others = [g for g in reading.gpus if old_dev is None or g.index not in old_dev]
    own = [g for g in reading.gpus if old_dev is not None and g.index in old_dev]
    ok = [g for g in others + own if fits(g)]
    free = ", ".join(f"GPU {g.index}: {_gib(g.free_bytes)} free of {_gib(g.total_bytes)}" for g in reading.gpus)
    want = f"{gpu_memory_utilization:g} x total + margin {_gib(margin_bytes)}"
    if len(ok) >= tensor_parallel_size:
        chosen = tuple(sorted(g.index for g in ok[:tensor_parallel_size]))
        where = "another GPU of the node" if old_dev is not None and not set(chosen) & set(old_dev) else \
            "the old server's GPU has room" if old_dev is not None else "free GPU memory"
        return SwitchPlan("beside", f"{where}: GPU(s) {list(chosen)} each hold {want} ({free}; "
                          f"{reading.source})", chosen, need_bytes, mem)
    return SwitchPlan("drain-and-replace", f"{tensor_parallel_size} GPU(s) with {want} free are needed beside the "
                      f"old server, {len(ok)} found ({free}; {reading.source})", old_dev, need_bytes, mem)


# ---- readers (the impure part) ------------------------------------------------------------------------------------

def read_cpu_memory(meminfo: Path = Path("/proc/meminfo")) -> MemoryReading:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return MemoryReading("cpu", f"MemAvailable in {meminfo}", available_bytes=int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError) as e:
        return MemoryReading("cpu", str(meminfo), error=f"{meminfo} unreadable: {e}")
    return MemoryReading("cpu", str(meminfo), error=f"no MemAvailable line in {meminfo}")


def parse_nvidia_smi(text: str) -> tuple[GpuMemory, ...]:
    """``nvidia-smi --query-gpu=index,memory.free,memory.total --format=csv,noheader,nounits`` (MiB)."""
    out = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3:
            raise ValueError(f"unexpected nvidia-smi line {line!r}")
        out.append(GpuMemory(int(parts[0]), int(float(parts[1])) * 2 ** 20, int(float(parts[2])) * 2 ** 20))
    return tuple(out)


def visible_indices(environ: dict | None = None) -> list[int] | None:
    """CUDA_VISIBLE_DEVICES as integer indices; None when unset or not plain indices (UUIDs)."""
    env = os.environ if environ is None else environ
    v = env.get("CUDA_VISIBLE_DEVICES")
    if v is None:
        return None
    try:
        return [int(x) for x in v.split(",") if x.strip()]
    except ValueError:
        return None


_TORCH_PROBE = ("import json, torch\n"
                "print(json.dumps([[i, *torch.cuda.mem_get_info(i)] for i in range(torch.cuda.device_count())]))")


def serving_python(vllm_cmd: list[str]) -> str | None:
    """The Python of the serving environment: the command itself when it is a Python, else the shebang of
    the ``vllm`` script."""
    exe = shutil.which(vllm_cmd[0]) if vllm_cmd else None
    if exe is None:
        return None
    if Path(exe).name.startswith("python"):
        return exe
    try:
        first = Path(exe).read_bytes()[:256].split(b"\n", 1)[0].decode()
    except OSError:
        return None
    return first[2:].strip().split()[0] if first.startswith("#!") and "python" in first else None


def read_gpu_memory(vllm_cmd: list[str] | None = None, environ: dict | None = None, timeout: float = 60,
                    run=subprocess.run) -> MemoryReading:
    """Free and total memory per GPU: nvidia-smi, else torch.cuda.mem_get_info in the serving env."""
    env = dict(os.environ if environ is None else environ)
    visible = visible_indices(env)
    errors = []
    smi = shutil.which("nvidia-smi", path=env.get("PATH"))
    if smi:
        try:
            p = run([smi, "--query-gpu=index,memory.free,memory.total", "--format=csv,noheader,nounits"],
                    capture_output=True, text=True, timeout=timeout)
            if p.returncode == 0:
                gpus = parse_nvidia_smi(p.stdout)
                if visible is not None:
                    gpus = tuple(g for g in gpus if g.index in visible)
                return MemoryReading("cuda", "nvidia-smi", gpus=gpus)
            errors.append(f"nvidia-smi exit {p.returncode}: {p.stderr.strip()[:200]}")
        except (OSError, ValueError, subprocess.TimeoutExpired) as e:
            errors.append(f"nvidia-smi: {e}")
    else:
        errors.append("nvidia-smi not found")
    py = serving_python(vllm_cmd or [])
    if py:
        try:
            p = run([py, "-c", _TORCH_PROBE], capture_output=True, text=True, timeout=timeout,
                    env={**env, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
            if p.returncode == 0:
                rows = json.loads(p.stdout.strip().splitlines()[-1])
                # torch numbers the visible devices 0..n-1: map them back to the indices they stand for
                idx = visible if visible is not None and len(visible) == len(rows) else None
                gpus = tuple(GpuMemory(idx[i] if idx else i, int(f), int(t)) for i, f, t in rows)
                return MemoryReading("cuda", f"torch.cuda.mem_get_info in {py}", gpus=gpus)
            errors.append(f"torch probe exit {p.returncode}: {p.stderr.strip()[-200:]}")
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired) as e:
            errors.append(f"torch probe: {e}")
    return MemoryReading("cuda", "none", error="; ".join(errors))


def read_memory(target: str, vllm_cmd: list[str] | None = None) -> MemoryReading:
    return read_gpu_memory(vllm_cmd) if target == "cuda" else read_cpu_memory()
