"""Quantize-stage benchmark on a GPU: llm-compressor 0.14 oneshot on a random-weight Llama.

No weights can be fetched on the GPU machine, so the model is a LlamaForCausalLM with
Llama-3-8B shapes (or 70B shapes, ``--shape 70b``), random bf16 weights and few layers;
calibration data are random token ids (128 x 2048 by default). Every variant runs in its
own process (fresh llm-compressor session, fresh CUDA allocator) and prints one JSON line;
the driver prints one JSON line with all of them.

Variants (``--variants``):
  default       run.py as it is: model loaded on the CPU, oneshot defaults
  gpu           model on the GPU, sequential_offload_device="cuda"
  gpu_hess      gpu + gpu_profile.install_fast_hessian("tf32")
  gpu_hess_bf16 gpu + install_fast_hessian("bf16")
  gpu_hess_bs8  gpu_hess + batch_size=8
  gpu_hess_bs8_basic  gpu_hess_bs8 with pipeline="basic" (no layer-by-layer error propagation)
  cpu_model_hess  model on CPU, activations on the GPU, fast Hessian (the big-model layout)
  tf32_all      gpu + torch TF32 for every float32 matmul (changes GPTQ numerics)
  rtn           round-to-nearest W4A16 (no calibration), for the quality probe only
  fp8, fp8_gpu  FP8 dynamic (default placement / model on the GPU)
  awq, awq_gpu  AWQ W4A16_ASYM via quantpipe's recipe (default / tuned placement)
Quality probe: relative L2 error of the final hidden states on 4 held-out random windows
against the bf16 model; equal figures across GPTQ variants mean the same algorithm.

  python bench/gpu_quantize_bench.py --layers 4 --variants default,gpu,gpu_hess
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "include"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from gpu_common import SHAPES, llama_config, sync  # noqa: E402  (bench/ is the script's folder)


def _tokenizer(folder: Path, vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(min(vocab, 1000))}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0", eos_token="t1")
    t.save_pretrained(folder)
    return t


def run_one(a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import LlamaForCausalLM

    from quantpipe.quantization import gpu_profile
    from quantpipe.quantization.recipes import build_recipe
    from quantpipe.settings import QuantSettings

    v = a.one
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    cfg = llama_config(a.shape, a.layers, a.vocab, max_positions=max(4096, a.seq))
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.eval()
    folder = Path(tempfile.mkdtemp(prefix="qbench-"))
    cfg.save_pretrained(folder)
    tok = _tokenizer(folder, a.vocab)
    model.config._name_or_path = str(folder)
    model.name_or_path = str(folder)
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, a.vocab, (a.samples, a.seq), generator=g)
    held = torch.randint(0, a.vocab, (4, a.seq), generator=g).to(dev)
    with torch.no_grad():
        ref = [model.model(input_ids=held[i:i + 1]).last_hidden_state.float() for i in range(len(held))]
    sync()
    t_build = time.perf_counter() - t0

    method = {"fp8": "fp8", "fp8_gpu": "fp8", "awq": "awq", "awq_gpu": "awq"}.get(v, "gptq")
    bits = 8 if method == "fp8" else 4
    s = QuantSettings(method=method, bits=bits, group_size=128)
    recipe = build_recipe(s)
    if v == "rtn":
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from quantpipe.quantization.recipes import _scheme

        recipe = [QuantizationModifier(config_groups={"group_0": _scheme(s)}, ignore=["lm_head"])]

    on_gpu = v.startswith("gpu") or v in ("tf32_all", "fp8_gpu", "awq_gpu", "rtn")
    kw: dict = {}
    if method != "fp8" and v != "rtn":
        ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": [[1] * a.seq] * a.samples})
        kw = dict(dataset=ds, num_calibration_samples=a.samples, max_seq_length=a.seq,
                  shuffle_calibration_samples=False)
    if v.startswith(("gpu", "cpu_model")) or v in ("tf32_all", "awq_gpu"):
        kw["sequential_offload_device"] = "cuda"
        kw["pipeline"] = "sequential"
    if "_bs8" in v:
        kw["batch_size"] = 8
    if v.endswith("_basic"):
        kw["pipeline"] = "basic"
    if "hess" in v:
        gpu_profile.install_fast_hessian("bf16" if v.endswith("bf16") else "tf32")
    if v == "tf32_all":
        torch.backends.cuda.matmul.allow_tf32 = True
    if not on_gpu:
        model.to("cpu")  # run.py loads the checkpoint on the CPU
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    # per-layer timestamps: end of each layer's calibration + GPTQ solve
    from llmcompressor.core import LifecycleCallbacks

    marks: list[float] = []
    orig = LifecycleCallbacks.sequential_epoch_end.__func__

    def _mark(cls, *args, **kwargs):
        r = orig(cls, *args, **kwargs)
        sync()
        marks.append(time.perf_counter())
        return r

    LifecycleCallbacks.sequential_epoch_end = classmethod(_mark)
    spent = _install_breakdown() if a.breakdown else None

    from llmcompressor import oneshot

    sync()
    t1 = time.perf_counter()
    with torch.no_grad():
        model = oneshot(model=model, tokenizer=tok, recipe=recipe, **kw)
    sync()
    t_oneshot = time.perf_counter() - t1
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0

    # quality probe
    rel = None
    try:
        if not on_gpu:
            model.to(dev)
        with torch.no_grad():
            errs = []
            for i in range(len(held)):
                h = model.model(input_ids=held[i:i + 1]).last_hidden_state.float()
                errs.append(((h - ref[i]).norm() / ref[i].norm()).item())
        rel = sum(errs) / len(errs)
    except Exception as e:  # keep the timing even if the probe fails
        print(f"quality probe failed: {e!r}", file=sys.stderr)
    diffs = [b - c for b, c in zip(marks[1:], marks[:-1])]
    out = {
        "variant": v, "shape": a.shape, "layers": a.layers, "samples": a.samples, "seq": a.seq,
        "oneshot_kwargs": {k: x for k, x in kw.items() if k not in ("dataset",)},
        "build_s": round(t_build, 2), "oneshot_s": round(t_oneshot, 2),
        "s_per_layer": round(t_oneshot / a.layers, 3),
        "s_per_layer_steady": round(sorted(diffs)[len(diffs) // 2], 3) if diffs else None,
        "first_layer_mark_s": round(marks[0] - t1, 2) if marks else None,
        "peak_gpu_gib": round(peak, 2), "rel_err_hidden": None if rel is None else round(rel, 5),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }
    if spent is not None:  # where the oneshot time went (synchronized, so a little slower)
        out["breakdown_s"] = {k: round(x, 2) for k, x in spent.items()}
        top = ("gptq_solve", "gptq_hessian", "awq_smoothing")  # awq_grid, awq_forward lie inside awq_smoothing
        out["breakdown_s"]["forward_and_rest"] = round(t_oneshot - sum(spent.get(k, 0.0) for k in top), 2)
    return out


def _install_breakdown() -> dict:
    """Time (with a device sync on each side) GPTQ's solves, its Hessian accumulation and
    AWQ's smoothing (its grid search and the forwards inside it apart)."""
    import functools

    from llmcompressor.modifiers.gptq import base as gptq_base
    from llmcompressor.modifiers.transform.awq import base as awq_base

    spent: dict[str, float] = {}

    def wrap(fn, key):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            sync()
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                spent[key] = spent.get(key, 0.0) + time.perf_counter() - t
        return timed

    gptq_base.GPTQModifier.compress_modules = wrap(gptq_base.GPTQModifier.compress_modules, "gptq_solve")
    gptq_base.accumulate_hessian = wrap(gptq_base.accumulate_hessian, "gptq_hessian")
    awq = awq_base.AWQModifier
    awq._apply_smoothing = wrap(awq._apply_smoothing, "awq_smoothing")
    awq._compute_best_scale = wrap(awq._compute_best_scale, "awq_grid")
    awq._run_samples = wrap(awq._run_samples, "awq_forward")
    return spent


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--variants", default="default,gpu,gpu_hess,gpu_hess_bs8")
    p.add_argument("--budget-s", type=float, default=540, help="skip variants once this much time has passed")
    p.add_argument("--logdir", default=os.environ.get("OUT", "."))
    p.add_argument("--breakdown", action="store_true", help="time solves, Hessians and AWQ smoothing apart")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(run_one(a)), flush=True)
        return
    t0 = time.perf_counter()
    results = []
    for v in a.variants.split(","):
        left = a.budget_s - (time.perf_counter() - t0)
        if left < 20:
            results.append({"variant": v, "skipped": "time budget"})
            continue
        cmd = [sys.executable, __file__, "--one", v] + [f"--{k}={getattr(a, k)}" for k in
                                                        ("shape", "layers", "vocab", "samples", "seq")]
        cmd += ["--breakdown"] if a.breakdown else []
        log = Path(a.logdir) / f"quant_{a.shape}_{v}.log"
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
            Path(log).write_text(r.stdout + "\n--- stderr ---\n" + r.stderr[-200000:])
            lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
            res = json.loads(lines[-1]) if lines else {"variant": v, "error": r.stderr[-1500:]}
        except subprocess.TimeoutExpired:
            res = {"variant": v, "skipped": "timeout"}
        print(json.dumps(res), flush=True)
        results.append(res)
    print(json.dumps({"bench": "gpu_quantize", "shape": a.shape, "layers": a.layers,
                      "calibration": f"{a.samples}x{a.seq}", "results": results}), flush=True)


if __name__ == "__main__":
    main()
