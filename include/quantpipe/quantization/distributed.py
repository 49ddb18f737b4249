"""llm-compressor's distributed oneshot: one process per GPU under torchrun.

The task's process plans the memory (``memory_plan``), writes a spec and launches
``torchrun --standalone --nproc-per-node N -m quantpipe.quantization.distributed SPEC``.
Each rank then (llm-compressor 0.14 / compressed-tensors 0.19, their documented recipe):

1. joins the process group: NCCL, one GPU per rank (``compressed_tensors.offload.init_dist``),
   or gloo on a CPU worker (the two-process test in CI);
2. loads the checkpoint inside ``load_offloaded_model``: rank 0 reads the weights into
   shared memory (and disk past the plan's host budget), the other ranks map them;
3. calibrates on its own share of the samples (``samples[rank::N]``): activations and
   Hessians are per rank, GPTQ's Hessians are summed onto the rank that solves each Linear
   and the solved weights are broadcast back, so every rank ends with the whole model;
4. saves with ``save_pretrained`` on every rank (compressed-tensors writes once).

Rank 0 writes ``result.json`` (timings, placement) beside its log; the launcher turns a
non-zero exit into a ``QuantizationError`` carrying the log's last lines.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from ..errors import QuantizationError

log = logging.getLogger(__name__)
RESULT = "result.json"
SPEC = "spec.json"


def launch(spec: dict, procs: int, workdir: Path, timeout_s: float | None = None) -> dict:
    """Run the ranks and return rank 0's result. ``spec`` holds: checkpoint, out, samples,
    max_seq_length, settings (QuantSettings as a dict), device, host_bytes (the loader's
    host-memory budget), offload_folder, model_bytes."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / SPEC).write_text(json.dumps(spec))
    (workdir / RESULT).unlink(missing_ok=True)
    logfile = workdir / "ranks.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    package_root = str(Path(__file__).resolve().parents[2])  # the ranks import this very quantpipe
    env["PYTHONPATH"] = os.pathsep.join(x for x in (package_root, env.get("PYTHONPATH")) if x)
    if spec["device"] == "cpu":
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // procs)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
           "-m", "quantpipe.quantization.distributed", str(workdir / SPEC)]
    log.info("distributed oneshot: %d processes on %s (log %s)", procs, spec["device"], logfile)
    t0 = time.perf_counter()
    with open(logfile, "wb") as out:
        try:
            rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired as e:
            raise QuantizationError(f"distributed oneshot ran past {timeout_s} s; log: {logfile}") from e
    if rc != 0 or not (workdir / RESULT).exists():
        tail = _tail(logfile)
        raise QuantizationError(f"distributed oneshot ({procs} processes) failed with exit code {rc}:\n{tail}")
    res = json.loads((workdir / RESULT).read_text())
    res["launcher_s"] = round(time.perf_counter() - t0, 2)
    return res


def _tail(path: Path, lines: int = 20) -> str:
    """Each rank's own error (the root cause is the one that is not a peer's lost
    connection), then the last lines of the log."""
    text = path.read_text(errors="replace").replace("\r", "\n")
    keep = [ln for ln in text.splitlines() if ln.strip() and "it/s]" not in ln and "s/it]" not in ln]
    errors = {}
    for ln in keep:
        m = re.match(r"^\[(rank\d+)\]: (\w+(?:Error|Exception)\b.*)$", ln)
        if m:
            errors[m.group(1)] = m.group(2)
    causes = sorted(errors.items(), key=lambda kv: "closed by peer" in kv[1])
    head = [f"{rank}: {err}" for rank, err in causes]
    return "\n".join(head + ["--- last lines of the log:"] + keep[-lines:])


def _init_group(device: str):
    import torch.distributed as dist

    if device == "cuda":
        from compressed_tensors.offload import init_dist

        init_dist()
    else:
        dist.init_process_group("gloo", init_method="env://")
    return dist.get_rank(), dist.get_world_size()


def run_rank(spec: dict) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch
    import torch.distributed as dist
    from compressed_tensors.offload import load_offloaded_model
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..settings import QuantSettings
    from . import gpu_profile
    from .recipes import build_recipe
    from .run import no_accelerator_pin_memory_shim

    device = spec["device"]
    rank, world = _init_group(device)
    t0 = time.perf_counter()
    s = QuantSettings(**spec["settings"])
    ckpt = Path(spec["checkpoint"])
    load_kw: dict = {"device_map": "auto_offload", "max_memory": {"cpu": int(spec["host_bytes"])}}
    if spec.get("offload_folder"):
        load_kw["offload_folder"] = spec["offload_folder"]
    with load_offloaded_model():
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype="auto", use_safetensors=True,
                                                     trust_remote_code=False, **load_kw)
    tok = AutoTokenizer.from_pretrained(ckpt, trust_remote_code=False)
    t_load = time.perf_counter() - t0
    mine = spec["samples"][rank::world]
    lens = [len(r) for r in mine]
    kwargs: dict = dict(dataset=Dataset.from_dict({"input_ids": mine, "attention_mask": [[1] * n for n in lens]}),
                        num_calibration_samples=len(mine), max_seq_length=spec["max_seq_length"],
                        shuffle_calibration_samples=False)
    if device == "cuda":
        gpu_profile.install_fast_hessian()
        kwargs.update(gpu_profile.gpu_oneshot_kwargs(model.config.num_hidden_layers, sample_lengths=lens,
                                                     hidden_size=model.config.hidden_size,
                                                     model_bytes=int(spec["model_bytes"])))
    else:
        no_accelerator_pin_memory_shim()
    t1 = time.perf_counter()
    with torch.no_grad():
        model = oneshot(model=model, tokenizer=tok, recipe=build_recipe(s), **kwargs)
    t_quant = time.perf_counter() - t1
    t2 = time.perf_counter()
    model.save_pretrained(spec["out"], save_compressed=True)
    dist.barrier()
    t_save = time.perf_counter() - t2
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    peaks = [None] * world
    dist.all_gather_object(peaks, peak)
    if rank == 0:
        res = {"procs": world, "device": device, "samples_per_rank": [len(spec["samples"][r::world]) for r in range(world)],
               "timings": {"load_s": round(t_load, 2), "oneshot_s": round(t_quant, 2), "save_s": round(t_save, 2),
                           "total_s": round(time.perf_counter() - t0, 2)},
               "peak_gpu_bytes": peaks,
               "oneshot": {k: str(v) for k, v in kwargs.items() if k != "dataset"},
               "load": {k: str(v) for k, v in load_kw.items()}}
        (Path(spec["workdir"]) / RESULT).write_text(json.dumps(res, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: torchrun --nproc-per-node N -m quantpipe.quantization.distributed SPEC.json", file=sys.stderr)
        return 2
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        print("run under torchrun (quantpipe.quantization.distributed.launch does)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    spec = json.loads(Path(argv[0]).read_text())
    spec.setdefault("workdir", str(Path(argv[0]).parent))
    run_rank(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
