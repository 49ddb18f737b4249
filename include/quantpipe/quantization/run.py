"""Stage 3b: run llm-compressor ``oneshot`` and store a compressed-tensors checkpoint.

The output is content-addressed by (checkpoint hash, settings, calibration set):
a retry or re-run with the same inputs finds the verified artifact and skips the
work. Beside the weights: ``recipe.yaml`` (written by llm-compressor) and
``quantpipe.json`` with settings, library versions, input hashes and timings.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from pydantic import BaseModel

from ..artifacts import ArtifactStore
from ..hashing import sha256_json
from ..settings import QuantEngine, QuantSettings
from .memory_plan import ModelSize, QuantPlan, Resources, plan_quantization
from .recipes import build_recipe

log = logging.getLogger(__name__)
PROVENANCE = "quantpipe.json"
LIBRARIES = ("llmcompressor", "compressed-tensors", "transformers", "torch")


class QuantizeResult(BaseModel):
    uri: str
    key: str
    scheme: str
    seconds: float
    size_bytes: int
    reused: bool = False


def no_accelerator_pin_memory_shim() -> None:
    """llm-compressor 0.14's AWQ pins cached activations unconditionally; pinning
    needs an accelerator. On a CPU-only worker make the pin a no-op (it is only an
    H2D transfer optimisation)."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.cuda.is_available() and not getattr(IntermediatesCache, "_quantpipe_cpu", False):
        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
        IntermediatesCache._quantpipe_cpu = True


def _installed(lib: str) -> str | None:
    try:
        return version(lib)
    except Exception:  # noqa: BLE001 - a library absent from this environment
        return None


def quantize_key(checkpoint_hash: str, s: QuantSettings, calibration_key: str | None,
                 hessian: str | None = None) -> str:
    """Everything that changes the written checkpoint: inputs, settings, the libraries that
    compute it and the Hessian path GPTQ takes (llm-compressor's own, or the GPU patch)."""
    return sha256_json({"ckpt": checkpoint_hash, "quant": s.model_dump(), "calib": calibration_key,
                        "libs": {lib: _installed(lib) for lib in LIBRARIES}, "hessian": hessian})[:16]


def _hessian_path() -> str:
    """Which GPTQ Hessian accumulation this worker runs (part of the cache key)."""
    import torch

    return "fast-bf16" if torch.cuda.is_available() else "llmcompressor"


def plan_for(checkpoint: Path, s: QuantSettings, samples: list[list[int]] | None, engine: QuantEngine,
             offload_dir: Path) -> QuantPlan:
    """The memory plan of this worker for this checkpoint (raises ``MemoryPlanError``)."""
    lens = [len(r) for r in samples] if (samples and s.needs_calibration) else []
    return plan_quantization(ModelSize.of(Path(checkpoint)), Resources.probe(offload_dir), method=s.method,
                             sample_lengths=lens, procs=engine.procs)


def quantize(store: ArtifactStore, checkpoint: Path, checkpoint_hash: str, s: QuantSettings,
             samples: list[list[int]] | None, calibration_key: str | None,
             max_seq_length: int, engine: QuantEngine | None = None) -> QuantizeResult:
    engine = engine or QuantEngine.from_env()
    offload_dir = engine.offload_dir or Path(tempfile.gettempdir()) / "quantpipe-offload"
    plan = plan_for(checkpoint, s, samples, engine, offload_dir)
    layout = _hessian_path() + (f"-ddp{plan.procs}" if plan.procs > 1 else "")
    key = quantize_key(checkpoint_hash, s, calibration_key, hessian=layout)
    name = f"{s.method}-{s.scheme.lower()}-{key}"
    found = store.find("quantized", name, deep=True)
    if found is not None:
        prov = json.loads((found / PROVENANCE).read_text())
        log.info("quantized checkpoint %s already stored and verified; skipping quantization", name)
        return QuantizeResult(uri=store.uri("quantized", name), key=key, scheme=s.scheme,
                              seconds=prov["timings"]["total_s"], size_bytes=prov["size_bytes"], reused=True)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("memory plan: %s", plan.as_dict())
    if plan.procs > 1:
        return quantize_distributed(store, name, Path(checkpoint), checkpoint_hash, s, samples or [],
                                     calibration_key, max_seq_length, plan, offload_dir, engine, key)
    no_accelerator_pin_memory_shim()
    t0 = time.perf_counter()
    # GPU workers: the measured profile (bench/README.md) - model and activations on the GPU
    # when they fit, GPTQ's Hessian on the tensor cores; the algorithm and recipe are unchanged
    load_kw: dict = {}
    ckpt_bytes = sum(p.stat().st_size for p in Path(checkpoint).glob("*.safetensors"))
    lens = [len(r) for r in samples] if samples else []
    if torch.cuda.is_available():
        from . import gpu_profile

        gpu_profile.install_fast_hessian()
    if plan.hold == "gpu":
        load_kw["device_map"] = "cuda"
    elif plan.hold == "host+disk":  # a folder of this run's own, removed when the process ends
        spill = tempfile.mkdtemp(prefix="offload-", dir=offload_dir)
        atexit.register(shutil.rmtree, spill, True)
        load_kw.update(device_map="auto_offload", max_memory={"cpu": plan.host_budget}, offload_folder=spill)
    loader = contextlib.nullcontext()
    if plan.hold == "host+disk":  # "auto_offload" is compressed-tensors' own device map
        from compressed_tensors.offload import load_offloaded_model

        loader = load_offloaded_model()
    # safetensors only, and never code shipped with the checkpoint
    with loader:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype="auto", use_safetensors=True,
                                                     trust_remote_code=False, **load_kw)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=False)
    t_load = time.perf_counter() - t0
    recipe = build_recipe(s)
    kwargs: dict = {}
    if s.needs_calibration:
        if not samples:
            raise ValueError(f"method {s.method} needs calibration samples")
        ds = Dataset.from_dict({"input_ids": samples, "attention_mask": [[1] * len(r) for r in samples]})
        kwargs = dict(dataset=ds, num_calibration_samples=len(samples), max_seq_length=max_seq_length,
                      shuffle_calibration_samples=False)
        if torch.cuda.is_available():
            from . import gpu_profile

            kwargs.update(gpu_profile.gpu_oneshot_kwargs(model.config.num_hidden_layers, sample_lengths=lens,
                                                         hidden_size=model.config.hidden_size,
                                                         model_bytes=ckpt_bytes))
    log.info("quantizing %s with %s (%s), %s calibration samples", checkpoint.name, s.method, s.scheme,
             len(samples) if samples else 0)
    t1 = time.perf_counter()
    with torch.no_grad():
        model = oneshot(model=model, tokenizer=tokenizer, recipe=recipe, **kwargs)
    t_quant = time.perf_counter() - t1
    meta = {"method": s.method, "scheme": s.scheme, "checkpoint_hash": checkpoint_hash}
    with store.writing("quantized", name, meta=meta) as out:
        t2 = time.perf_counter()
        model.save_pretrained(out, save_compressed=True)
        tokenizer.save_pretrained(out)
        t_save = time.perf_counter() - t2
        size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        prov = provenance(s, checkpoint, checkpoint_hash, calibration_key, len(samples) if samples else 0, size,
                          placement={"load": {k: str(v) for k, v in load_kw.items()},
                                     "oneshot": {k: str(v) for k, v in kwargs.items() if k not in ("dataset",)},
                                     "plan": plan.as_dict()},
                          timings={"load_s": round(t_load, 2), "oneshot_s": round(t_quant, 2),
                                   "save_s": round(t_save, 2), "total_s": round(time.perf_counter() - t0, 2)})
        (out / PROVENANCE).write_text(json.dumps(prov, indent=1))
    log.info("quantized in %.1f s (oneshot %.1f s); %.1f MB", prov["timings"]["total_s"], t_quant, size / 1e6)
    return QuantizeResult(uri=store.uri("quantized", name), key=key, scheme=s.scheme,
                          seconds=prov["timings"]["total_s"], size_bytes=size)


def provenance(s: QuantSettings, checkpoint: Path, checkpoint_hash: str, calibration_key: str | None,
               samples: int, size: int, *, placement: dict, timings: dict) -> dict:
    """What ``quantpipe.json`` records of a quantization, in one process or several."""
    return {"settings": s.model_dump(), "scheme": s.scheme, "input_checkpoint": str(checkpoint),
            "input_checkpoint_hash": checkpoint_hash, "calibration_key": calibration_key,
            "calibration_samples": samples, "versions": {lib: version(lib) for lib in LIBRARIES},
            "placement": placement, "timings": timings, "size_bytes": size}


def quantize_distributed(store: ArtifactStore, name: str, checkpoint: Path, checkpoint_hash: str,
                          s: QuantSettings, samples: list[list[int]], calibration_key: str | None,
                          max_seq_length: int, plan: QuantPlan, offload_dir: Path, engine: QuantEngine,
                          key: str) -> QuantizeResult:
    """The same recipe, calibration and checkpoint format, run by ``plan.procs`` processes."""
    from transformers import AutoTokenizer

    from . import distributed

    if not samples:
        raise ValueError(f"method {s.method} needs calibration samples")
    log.info("quantizing %s with %s (%s), %d calibration samples over %d processes", checkpoint.name, s.method,
             s.scheme, len(samples), plan.procs)
    meta = {"method": s.method, "scheme": s.scheme, "checkpoint_hash": checkpoint_hash}
    with (store.writing("quantized", name, meta=meta) as out, tempfile.TemporaryDirectory(prefix="qp-ddp-") as wd,
          tempfile.TemporaryDirectory(prefix="offload-", dir=offload_dir) as spill):
        spec = {"checkpoint": str(checkpoint), "out": str(out), "samples": samples, "max_seq_length": max_seq_length,
                "settings": s.model_dump(mode="json"), "device": plan.device, "host_bytes": plan.host_budget,
                "offload_folder": spill if plan.disk_bytes else None,
                "model_bytes": plan.host_bytes + plan.disk_bytes}
        res = distributed.launch(spec, plan.procs, Path(wd), timeout_s=engine.timeout_s)
        AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=False).save_pretrained(out)
        size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        prov = provenance(s, checkpoint, checkpoint_hash, calibration_key, len(samples), size,
                          placement={"load": res["load"], "oneshot": res["oneshot"], "plan": plan.as_dict(),
                                     "samples_per_rank": res["samples_per_rank"],
                                     "peak_gpu_bytes": res["peak_gpu_bytes"]},
                          timings={**res["timings"], "total_s": res["launcher_s"]})
        (out / PROVENANCE).write_text(json.dumps(prov, indent=1))
    log.info("quantized by %d processes in %.1f s (oneshot %.1f s); %.1f MB", plan.procs, res["launcher_s"],
             res["timings"]["oneshot_s"], size / 1e6)
    return QuantizeResult(uri=store.uri("quantized", name), key=key, scheme=s.scheme, seconds=res["launcher_s"],
                          size_bytes=size)
