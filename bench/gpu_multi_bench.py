"""A model of 70B shapes through the product's quantize and validation code on one GPU and
on two: llm-compressor's distributed oneshot (``quantization.distributed``, torchrun, one
process per GPU) and the evaluation split over GPUs (``validation.sharding``).

No weights can be fetched on the device and a full 80-layer bf16 checkpoint (~141 GB)
does not fit its disk beside the rest, so the model has Llama-3-70B layer shapes (hidden
8192, intermediate 28672, 64 heads, 8 KV heads) with ``--layers`` layers, random bf16
weights and the small model's tokenizer (its vocabulary, 49,152, instead of 128,256: the
output head is 0.4 of Llama-3-70B's). Per-layer figures are projected to 80 layers.

Steps (each timed; peak GPU memory per device, peak host RSS):
  build     the checkpoint, written with ``save_pretrained`` (safetensors shards)
  quantize  ``quantization.run.quantize`` with GPTQ W4A16 group 128 on ``--samples`` x
            ``--seq`` random calibration tokens, once per process count in ``--procs``
  validate  ``validation.metrics.measure`` on the baseline and on the candidate (KL against
            the baseline), once per split in ``--splits`` (never: one GPU; always: every GPU)

  python bench/gpu_multi_bench.py --layers 8 --assets .bench-assets --procs 2,1 --splits always,never
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "include"), str(REPO)]

from bench.gpu_common import llama_config  # noqa: E402

GIB = 1024 ** 3


def emit(rec: dict) -> None:
    print(json.dumps(rec), flush=True)


def peak_host_gib() -> dict:
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 ** 2
    return {"self": round(me, 1), "children": round(kids, 1)}


def gpu_peaks() -> list[float]:
    import torch

    if not torch.cuda.is_available():
        return []
    out = [round(torch.cuda.max_memory_allocated(i) / GIB, 1) for i in range(torch.cuda.device_count())]
    for i in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(i)
    return out


def build(a, work: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(Path(a.assets) / "tokenizer")
    ckpt = work / "ckpt"
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(llama_config(a.shape, a.layers, len(tok))).to(torch.bfloat16)
    model.save_pretrained(ckpt, max_shard_size="4GB")
    tok.save_pretrained(ckpt)
    n = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    emit({"step": "build", "shape": a.shape, "layers": a.layers, "params": n, "vocab": len(tok),
          "bytes": sum(p.stat().st_size for p in ckpt.glob("*.safetensors")),
          "seconds": round(time.perf_counter() - t0, 1)})
    return ckpt


def quantize(a, ckpt: Path, work: Path, procs: int) -> Path:
    import torch

    from quantpipe.artifacts import ArtifactStore, uri_to_path
    from quantpipe.quantization.run import PROVENANCE
    from quantpipe.quantization.run import quantize as run_quantize
    from quantpipe.settings import QuantEngine, QuantSettings

    g = torch.Generator().manual_seed(1)
    samples = [torch.randint(0, 49152, (a.seq,), generator=g).tolist() for _ in range(a.samples)]
    s = QuantSettings(method="gptq", bits=4, group_size=128)
    gpu_peaks()
    t0 = time.perf_counter()
    engine = QuantEngine(procs=abs(procs), offload_dir=work / "offload")
    if procs < 0:  # the torchrun launcher with |procs| processes even where the plan would run in-process
        import dataclasses

        from quantpipe.quantization import run as qrun

        plan = dataclasses.replace(qrun.plan_for(ckpt, s, samples, engine, work / "offload"), procs=abs(procs),
                                   hold="host", host_budget=200 * GIB)
        key = qrun.quantize_key("bench", s, "bench", hessian=f"launcher{procs}")
        res = qrun.quantize_distributed(ArtifactStore(work / f"q{procs}"), f"gptq-{key}", ckpt, "bench", s,
                                         samples, "bench", a.seq, plan, work / "offload", engine, key)
    else:
        res = run_quantize(ArtifactStore(work / f"q{procs}"), ckpt, f"bench-{procs}", s, samples, "bench", a.seq,
                           engine=engine)
    wall = time.perf_counter() - t0
    out = uri_to_path(res.uri)
    prov = json.loads((out / PROVENANCE).read_text())
    t = prov["timings"]
    emit({"step": "quantize", "procs": procs, "plan": prov["placement"]["plan"], "timings": t,
          "wall_s": round(wall, 1), "oneshot_s_per_layer": round(t["oneshot_s"] / a.layers, 2),
          "projected_80_layers_oneshot_min": round(t["oneshot_s"] / a.layers * 80 / 60, 1),
          "peak_gpu_gib_per_rank": [round(b / GIB, 1) for b in prov["placement"].get("peak_gpu_bytes", [])]
          or gpu_peaks(), "peak_host_gib": peak_host_gib(), "size_bytes": res.size_bytes})
    return out


def validate(a, ckpt: Path, cand: Path, split: str) -> None:
    import dataclasses

    from quantpipe.assets.corpus import read_texts
    from quantpipe.settings import EvalSettings
    from quantpipe.validation.engine.placement import resolve_placement
    from quantpipe.validation.metrics import measure
    from quantpipe.validation.sharding import placed

    texts = read_texts(Path(a.assets) / "heldout.jsonl")
    s = EvalSettings(ppl_max_tokens=a.ppl_tokens, ppl_window=2048, num_prompts=a.prompts, max_new_tokens=32,
                     task_limit=0, sensitivity_layers=0)
    placement = dataclasses.replace(resolve_placement(), shard=split)
    used = placed(ckpt, placement)
    gpu_peaks()
    t0 = time.perf_counter()
    base = measure(ckpt, texts, s, None, placement=placement)
    tb = time.perf_counter() - t0
    peaks_b = gpu_peaks()
    t1 = time.perf_counter()
    cand_m = measure(cand, texts, s, None, reference=base["dist"], placement=placement)
    tc = time.perf_counter() - t1
    emit({"step": "validate", "split": split, "gpus": used.shard_gpus, "cuda_graph": used.cuda_graph,
          "baseline": {"seconds": round(tb, 1), "load_s": base["load_seconds"], "peak_gpu_gib": peaks_b,
                       "perplexity": base["perplexity"]["perplexity"]},
          "candidate": {"seconds": round(tc, 1), "load_s": cand_m["load_seconds"], "peak_gpu_gib": gpu_peaks(),
                        "perplexity": cand_m["perplexity"]["perplexity"], "kl_mean": cand_m["perplexity"]["kl"]["mean"]},
          "measure_s_per_layer": round((tb + tc - base["load_seconds"] - cand_m["load_seconds"]) / a.layers, 2),
          "peak_host_gib": peak_host_gib()})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="70b")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--procs", default="2,1", help="process counts; -n: the torchrun launcher with n processes")
    p.add_argument("--splits", default="always,never")
    p.add_argument("--ppl-tokens", type=int, default=16384)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--assets", default=str(REPO / ".bench-assets"))
    p.add_argument("--work", default="/tmp/multi-bench")
    p.add_argument("--skip-validate", action="store_true")
    p.add_argument("--validate-only", action="store_true", help="reuse --work's checkpoint and candidate")
    a = p.parse_args()
    import torch

    work = Path(a.work)
    emit({"step": "machine", "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
          "cpu_smoke": not torch.cuda.is_available(),
          "torch": torch.__version__, "shm_gib": round(shutil.disk_usage("/dev/shm").total / GIB, 1)})
    if a.validate_only:
        ckpt = work / "ckpt"
        cand = next(p for p in sorted(work.glob("q*/quantized/*")) if (p / "config.json").exists())
        for split in a.splits.split(","):
            validate(a, ckpt, cand, split)
        return
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ckpt = build(a, work)
    cands = {}
    for n in [int(x) for x in a.procs.split(",") if x]:  # noqa: B007
        try:
            cands[n] = quantize(a, ckpt, work, n)
        except Exception as e:  # noqa: BLE001 - a bench records the failure and goes on
            emit({"step": "quantize", "procs": n, "error": str(e)[-3000:]})
    if cands and not a.skip_validate:
        cand = next(iter(cands.values()))
        for split in a.splits.split(","):
            try:
                validate(a, ckpt, cand, split)
            except Exception as e:  # noqa: BLE001
                emit({"step": "validate", "split": split, "error": str(e)[-3000:]})


if __name__ == "__main__":
    main()
