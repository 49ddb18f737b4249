"""Where quantization holds the model, decided before anything is loaded.

llm-compressor's sequential pipeline keeps the model where it was loaded and brings one
decoder layer at a time onto the GPU with the calibration activations. So a worker needs:

- **GPU, per process**: the largest decoder layer, GPTQ's Hessians for that layer (one
  float32 ``in x in`` matrix per quantized Linear: 4.9 GB for a 70B layer) and a reserve for
  the solve and the CUDA context; the activation cache of the samples the process
  calibrates on (in a distributed run each process takes its share) too when it fits,
  else that cache lives in host memory (``gpu_profile.gpu_oneshot_kwargs`` decides alike).
- **Host, once**: the whole checkpoint. One process holds it in its own memory; a
  distributed run (torchrun, one process per GPU) holds it in ``/dev/shm``, shared by the
  processes (compressed-tensors' offload), so shared memory must be sized for it (a
  container's default is 64 MB: set ``shm_size``).
- **Disk**, when the host is short: what does not fit is offloaded to a folder
  (``device_map="auto_offload"``): slow, but it finishes.

A plan that cannot be met raises ``MemoryPlanError`` naming what is short and by how
much, before minutes of loading end in an out-of-memory kill.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import QuantizationError
from ..prep.checkpoint import read_safetensors_header

GIB = 1024 ** 3
GPU_RESERVE = 8 * GIB  # GPTQ solve workspace, CUDA context, allocator slack
HOST_RESERVE = 5 * GIB  # tokenizer, datasets, Python: what compressed-tensors reserves too
LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.")
DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# methods whose oneshot llm-compressor 0.14 runs data-parallel under torchrun (GPTQ solves
# split across ranks; AWQ and SmoothQuant reduce their statistics); FP8 needs no calibration
DISTRIBUTED_METHODS = ("gptq", "awq", "w8a8")


class MemoryPlanError(QuantizationError):
    """The worker cannot hold what quantizing this checkpoint needs."""


@dataclass(frozen=True)
class ModelSize:
    total_bytes: int
    layers: int
    largest_layer_bytes: int
    hidden_size: int
    hessian_bytes: int  # GPTQ Hessians of the largest layer (float32 in x in per Linear)

    @classmethod
    def of(cls, checkpoint: Path) -> "ModelSize":
        """Read from the safetensors headers and config.json: no weight is loaded."""
        cfg = json.loads((checkpoint / "config.json").read_text())
        per_layer: dict[int, int] = {}
        hess: dict[int, int] = {}
        total = 0
        for f in sorted(checkpoint.glob("*.safetensors")):
            for name, t in read_safetensors_header(f).items():
                if name == "__metadata__":
                    continue
                count = 1
                for d in t["shape"]:
                    count *= d
                nbytes = count * DTYPE_BYTES.get(t["dtype"], 2)
                total += nbytes
                m = LAYER.match(name)
                if m:
                    i = int(m.group(1))
                    per_layer[i] = per_layer.get(i, 0) + nbytes
                    if name.endswith(".weight") and len(t["shape"]) == 2:
                        hess[i] = hess.get(i, 0) + 4 * t["shape"][1] ** 2
        if not per_layer:
            raise MemoryPlanError(f"{checkpoint}: no decoder layers (model.layers.N.*) in the safetensors files")
        return cls(total_bytes=total, layers=len(per_layer), largest_layer_bytes=max(per_layer.values()),
                   hidden_size=int(cfg["hidden_size"]), hessian_bytes=max(hess.values(), default=0))


@dataclass(frozen=True)
class Resources:
    gpu_free: tuple[int, ...]  # free bytes per visible GPU; empty on a CPU worker
    host_available: int
    shm_bytes: int
    disk_free: int  # at the offload folder

    @classmethod
    def probe(cls, offload_folder: Path) -> "Resources":
        import shutil

        import psutil

        gpus: tuple[int, ...] = ()
        try:
            import torch

            if torch.cuda.is_available():
                gpus = tuple(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
        except Exception:  # noqa: BLE001 - no usable CUDA: a CPU worker
            gpus = ()
        shm = shutil.disk_usage("/dev/shm").total if Path("/dev/shm").exists() else 0
        offload_folder.mkdir(parents=True, exist_ok=True)
        return cls(gpu_free=gpus, host_available=psutil.virtual_memory().available, shm_bytes=shm,
                   disk_free=shutil.disk_usage(offload_folder).free)


@dataclass(frozen=True)
class QuantPlan:
    procs: int  # processes (one per GPU under torchrun; 1: in the task's own process)
    device: str  # "cuda" or "cpu"
    hold: str  # where the model lives: "gpu" (whole, on GPU 0), "host", or "host+disk"
    host_bytes: int  # of the model kept in host (shared) memory
    disk_bytes: int  # of the model offloaded to disk
    per_gpu_need: int
    notes: list[str] = field(default_factory=list)
    host_budget: int = 0  # the most host (shared) memory the loader may fill: max_memory["cpu"]

    def as_dict(self) -> dict:
        return asdict(self)


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def activation_bytes(sample_lengths: Sequence[int], hidden_size: int, procs: int) -> int:
    """One process's share of the sequential pipeline's activation cache (bf16, held twice
    while a layer's outputs replace its inputs)."""
    return -(-2 * sum(sample_lengths) * hidden_size * 2 // max(1, procs))


def plan_quantization(model: ModelSize, res: Resources, *, method: str, sample_lengths: Sequence[int],
                      procs: int = 0) -> QuantPlan:
    """``procs``: 0 picks one process per visible GPU for the methods llm-compressor runs
    distributed (1 otherwise); n > 1 asks for n processes (on a CPU worker: gloo, for tests)."""
    gpus = len(res.gpu_free)
    notes: list[str] = []
    if procs < 0:
        raise MemoryPlanError(f"procs must be >= 0 (0: one per GPU), got {procs}")
    if procs == 0:
        procs = gpus if gpus > 1 and method in DISTRIBUTED_METHODS and sample_lengths else 1
    if procs > 1 and method not in DISTRIBUTED_METHODS:
        notes.append(f"{method} is not run distributed by llm-compressor: one process")
        procs = 1
    if gpus and procs > gpus:
        raise MemoryPlanError(f"{procs} quantization processes asked for, but this worker sees {gpus} GPU(s)")
    device = "cuda" if gpus else "cpu"

    acts = activation_bytes(sample_lengths, model.hidden_size, procs)
    per_gpu = model.largest_layer_bytes + model.hessian_bytes + GPU_RESERVE
    acts_on_host = 0
    if gpus:
        smallest = min(res.gpu_free[:procs])
        if smallest < per_gpu:
            raise MemoryPlanError(
                f"one decoder layer does not fit a GPU: it needs {_gib(per_gpu)} (layer "
                f"{_gib(model.largest_layer_bytes)}, GPTQ Hessians {_gib(model.hessian_bytes)}, reserve "
                f"{_gib(GPU_RESERVE)}) and the GPU has {_gib(smallest)} free; quantize on a larger GPU")
        # the whole model on the GPU (no onloading) when one process has room to spare
        if procs == 1 and res.gpu_free[0] > model.total_bytes + acts + per_gpu:
            return QuantPlan(1, device, "gpu", 0, 0, per_gpu + acts, notes + ["model, activations on GPU 0"])
        if smallest >= per_gpu + acts:
            per_gpu += acts
        else:  # the sequential pipeline keeps the activation cache in host memory instead
            acts_on_host = acts * procs
            notes.append(f"activation cache ({_gib(acts)} per process) in host memory: it does not fit "
                         f"beside a layer on the GPU")
    else:
        acts_on_host = acts * procs

    host_room = res.host_available - HOST_RESERVE - acts_on_host
    if procs > 1:  # compressed-tensors shares the offloaded model through /dev/shm
        host_room = min(host_room, res.shm_bytes - HOST_RESERVE)
        where = f"shared memory (/dev/shm: {_gib(res.shm_bytes)}; in a container raise shm_size)"
    else:
        where = f"host memory ({_gib(res.host_available)} available)"
    if acts_on_host and res.host_available - HOST_RESERVE < acts_on_host:
        raise MemoryPlanError(
            f"the activation cache of {sum(sample_lengths)} calibration tokens ({_gib(acts_on_host)}) fits "
            f"neither the GPU nor host memory ({_gib(res.host_available)} available); use fewer or shorter "
            f"calibration samples")
    if model.total_bytes <= host_room:
        return QuantPlan(procs, device, "host", model.total_bytes, 0, per_gpu, notes, host_room)
    spill = model.total_bytes - max(0, host_room)
    if spill <= res.disk_free - GIB:
        notes.append(f"{_gib(spill)} of the model offloaded to disk: {where} holds {_gib(max(0, host_room))}")
        return QuantPlan(procs, device, "host+disk", model.total_bytes - spill, spill, per_gpu, notes,
                         max(0, host_room))
    raise MemoryPlanError(
        f"the checkpoint ({_gib(model.total_bytes)}) fits neither {where} (room for {_gib(max(0, host_room))} "
        f"after a {_gib(HOST_RESERVE)} reserve) nor that plus the offload disk ({_gib(res.disk_free)} free); "
        f"free memory or disk, or quantize on a larger worker")
