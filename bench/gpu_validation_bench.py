"""Validation-stage throughput on a GPU, against the bf16 matmul roofline of the same run.

A LlamaForCausalLM with Llama-3-8B shapes and random bf16 weights (32 layers by default:
16 GB fits an H100) is measured two ways, both through the product's own code
(``quantpipe.validation``), with the placement a GPU worker resolves by default
(``EvalEngine``: CUDA, bfloat16, batched perplexity windows, log-likelihood batches under
a token budget, batched greedy decoding with a CUDA-graph step):

  parts  each kind of work on synthetic requests, against its naive form: perplexity
         windows (batch 1 vs the engine's batch), many short multiple-choice log-likelihood
         requests (one request per forward with logits everywhere vs
         ``engine.loglikelihoods``), greedy generation (one prompt at a time with HF
         ``generate`` vs ``engine.greedy``)
  stage  ``metrics.measure_loaded``: exactly what the validation stage runs on a loaded
         model, on the shipped held-out text, prompts and lm-eval task sets (``--assets``:
         the small model's tokenizer, ``heldout.jsonl``, the task folder), first as the
         baseline, then as the candidate with KL against the baseline's reference

Useful tokens = tokens of the requests (never padding) + generated tokens. The candidate's
pass is the stage's cost on a re-run (the baseline is cached by checkpoint hash); the
figure with the baseline measured too is printed beside it. Roofline tokens/s = measured
bf16 matmul TFLOP/s / (2 x matmul params per token). Prints one JSON line.

  python bench/gpu_validation_bench.py --layers 32 --assets .bench-assets
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "include"))

from gpu_common import SHAPES, llama_config, sync  # noqa: E402  (bench/ is the script's folder)


def timed(fn):
    sync()
    t = time.perf_counter()
    r = fn()
    sync()
    return r, time.perf_counter() - t


def matmul_tflops(dev: str, n: int) -> float:
    import torch

    a = [torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2)]
    b = [torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2)]
    for i in range(3):
        a[i % 2] @ b[i % 2]
    times = []
    for i in range(20):
        _, dt = timed(lambda: a[i % 2] @ b[i % 2])
        times.append(dt)
    times.sort()
    return 2 * n ** 3 / times[len(times) // 2] / 1e12


def mc_naive(model, reqs) -> list[float]:
    import torch

    dev = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for ctx, cont in reqs:
            ids = torch.tensor([ctx + cont], device=dev)
            lp = torch.log_softmax(model(input_ids=ids).logits[0].float()[len(ctx) - 1:-1], -1)
            out.append(lp.gather(1, ids[0, len(ctx):, None]).sum().item())
    return out


def gen_naive(model, prompts, new: int):
    import torch

    dev = next(model.parameters()).device
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device=dev)
            o = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                               min_new_tokens=new, do_sample=False, pad_token_id=0)
            outs.append(o[0, len(p):].tolist())
    return outs


def parts(model, placement, a, res: dict) -> None:
    """Each kind of work alone: naive against the engine, synthetic token ids."""
    import torch

    from quantpipe.validation.engine.decoding import greedy
    from quantpipe.validation.engine.packing import loglikelihoods
    from quantpipe.validation.metrics import perplexity

    g = torch.Generator().manual_seed(1)
    V = a.vocab
    ids = torch.randint(0, V, (a.windows * a.window,), generator=g).tolist()
    reqs = [(torch.randint(0, V, (c,), generator=g).tolist(), torch.randint(0, V, (k,), generator=g).tolist())
            for c, k in zip(torch.randint(40, 121, (a.mc,), generator=g).tolist(),
                            torch.randint(1, 21, (a.mc,), generator=g).tolist())]
    plens = torch.randint(32, 97, (a.prompts,), generator=g).tolist()
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in plens]

    perplexity(model, ids[:a.window], a.window)  # warm-up
    _, t1 = timed(lambda: perplexity(model, ids[:8 * a.window], a.window, batch=1))
    _, tb = timed(lambda: perplexity(model, ids, a.window, batch=placement.ppl_batch))
    res["ppl"] = {"tokens": len(ids), "naive_b1_tok_s": round(8 * a.window / t1),
                  "engine_tok_s": round(len(ids) / tb), "batch": placement.ppl_batch, "engine_s": round(tb, 3)}

    mc_tokens = sum(len(c) + len(k) for c, k in reqs)
    loglikelihoods(model, reqs[:8], placement.token_budget, pack=placement.pack_width)
    naive, tn = timed(lambda: mc_naive(model, reqs[:a.mc_naive]))
    tuned, tm = timed(lambda: loglikelihoods(model, reqs, placement.token_budget, pack=placement.pack_width))
    diff = max(abs(x - y[0]) for x, y in zip(naive, tuned))
    res["mc"] = {"requests": a.mc, "tokens": mc_tokens,
                 "naive_tok_s": round(sum(len(c) + len(k) for c, k in reqs[:a.mc_naive]) / tn),
                 "engine_tok_s": round(mc_tokens / tm), "engine_s": round(tm, 3),
                 "max_abs_loglik_diff_vs_naive": round(diff, 4), "token_budget": placement.token_budget,
                 "pack_width": placement.pack_width}

    gen_tokens = sum(plens) + a.prompts * a.new_tokens
    greedy(model, prompts[:2], 4, 0, cuda_graph=placement.cuda_graph)
    gn, tgn = timed(lambda: gen_naive(model, prompts[:a.gen_naive], a.new_tokens))
    ge, tge = timed(lambda: greedy(model, prompts, a.new_tokens, 0, cuda_graph=False))
    gg, tgg = timed(lambda: greedy(model, prompts, a.new_tokens, 0, cuda_graph=placement.cuda_graph))
    res["gen"] = {"prompts": a.prompts, "new_tokens": a.new_tokens, "tokens": gen_tokens,
                  "naive_tok_s": round((sum(plens[:a.gen_naive]) + a.gen_naive * a.new_tokens) / tgn),
                  "engine_eager_tok_s": round(gen_tokens / tge), "engine_tok_s": round(gen_tokens / tgg),
                  "engine_s": round(tgg, 3), "decode_ms_per_step": round(1000 * tgg / a.new_tokens, 2),
                  "cuda_graph": placement.cuda_graph,
                  "rows_graph_same_as_eager": f"{sum(x == y for x, y in zip(gg, ge))}/{a.prompts}",
                  "rows_eager_same_as_generate": f"{sum(x == y for x, y in zip(ge, gn))}/{a.gen_naive}"}
    t = tb + tm + tgg
    total = len(ids) + mc_tokens + gen_tokens
    res["parts_pass"] = {"tokens": total, "seconds": round(t, 3), "useful_tok_s": round(total / t),
                         "pct_of_roofline": round(100 * total / t / res["roofline_tok_s"], 1)}
    if placement.overlap and dev_is_cuda(model):
        # the product's arrangement (metrics.measure_loaded): log-likelihoods beside
        # perplexity then generation
        from quantpipe.validation.engine.streams import overlapped

        def main_part():
            return perplexity(model, ids, a.window, batch=placement.ppl_batch), \
                greedy(model, prompts, a.new_tokens, 0, cuda_graph=placement.cuda_graph)

        (_, gens_ov), t_ov = timed(lambda: overlapped(main_part, lambda: loglikelihoods(model, reqs, placement.token_budget,
                                                                                       pack=placement.pack_width)))
        res["parts_pass_overlapped"] = {"seconds": round(t_ov, 3), "useful_tok_s": round(total / t_ov),
                                        "pct_of_roofline": round(100 * total / t_ov / res["roofline_tok_s"], 1),
                                        "greedy_rows_same_as_sequential": f"{sum(x == y for x, y in zip(gens_ov, gg))}/{a.prompts}"}


def dev_is_cuda(model) -> bool:
    return next(model.parameters()).device.type == "cuda"


def task_folder(src: Path, dest: Path) -> Path:
    """The shipped task YAMLs name their data files by absolute path: point them here."""
    import yaml

    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".jsonl":
            shutil.copy(f, dest / f.name)
    for f in src.glob("*.yaml"):
        cfg = yaml.safe_load(f.read_text())
        files = cfg["dataset_kwargs"]["data_files"]
        cfg["dataset_kwargs"]["data_files"] = {k: str(dest / Path(v).name) for k, v in files.items()}
        (dest / f.name).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest


class Counter:
    """Counts the useful tokens the engine is given (request tokens and generated tokens) and
    the time spent inside the engine (device synced), so the rest is lm-eval's own work."""

    def __init__(self):
        self.reset()

    timing = True  # off while streams overlap: its device syncs would serialize them

    def reset(self):
        self.tokens = {"perplexity": 0, "loglikelihood": 0, "generation": 0}
        self.seconds = {"loglikelihood": 0.0, "generation": 0.0}
        self.calls: list[dict] = []  # each engine call (timed passes only)

    def install(self):
        from quantpipe.validation import accuracy, metrics
        from quantpipe.validation.engine import decoding, packing

        ll, gr, ppl = packing.loglikelihoods, decoding.greedy, metrics.perplexity

        def loglik(model, reqs, budget, **kw):
            n = sum(len(c) + len(k) for c, k in reqs)
            self.tokens["loglikelihood"] += n
            if not self.timing:
                return ll(model, reqs, budget, **kw)
            out, dt = timed(lambda: ll(model, reqs, budget, **kw))
            self.seconds["loglikelihood"] += dt
            self.calls.append({"loglikelihood": len(reqs), "tokens": n, "s": round(dt, 3)})
            return out

        def greedy(model, prompts, new, pad, **kw):
            if self.timing:
                out, dt = timed(lambda: gr(model, prompts, new, pad, **kw))
                self.seconds["generation"] += dt
                self.calls.append({"greedy": len(prompts), "prompt_tokens": sum(len(p) for p in prompts),
                                   "longest": max(len(p) for p in prompts), "new": new,
                                   "steps": max(len(o) for o in out), "s": round(dt, 3)})
            else:
                out = gr(model, prompts, new, pad, **kw)
            self.tokens["generation"] += sum(len(p) for p in prompts) + sum(len(o) for o in out)
            return out

        def perplexity(model, ids, window, reference=None, batch=1):
            out = ppl(model, ids, window, reference, batch)
            self.tokens["perplexity"] += out["tokens"] + len(range(0, len(ids), window))
            return out

        accuracy.loglikelihoods, accuracy.greedy, metrics.greedy, metrics.perplexity = loglik, greedy, greedy, perplexity


def graph_check(res: dict) -> None:
    """CUDA-graph decoding against eager decoding and HF ``generate`` on a small float32
    model, where logit gaps are wide enough for greedy tokens to be compared exactly."""
    import torch
    from transformers import LlamaForCausalLM

    from quantpipe.validation.engine.decoding import greedy

    torch.manual_seed(0)
    with torch.device("cuda"):
        m = LlamaForCausalLM(llama_config("tiny", 4, 1000)).float().eval()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 1000, (n,), generator=g).tolist() for n in (5, 17, 33, 8, 60, 21, 2, 40)]
    graph = greedy(m, prompts, 48, 0, cuda_graph=True)
    eager = greedy(m, prompts, 48, 0, cuda_graph=False)
    gen = gen_naive(m, prompts, 48)
    res["graph_check_fp32_tiny"] = {"rows": len(prompts), "graph_same_as_eager": sum(x == y for x, y in zip(graph, eager)),
                                    "eager_same_as_generate": sum(x == y for x, y in zip(eager, gen))}


def stage(model, placement, a, res: dict) -> None:
    from transformers import AutoTokenizer

    from quantpipe.assets.corpus import read_texts
    from quantpipe.settings import EvalSettings
    from quantpipe.validation.metrics import measure_loaded
    from quantpipe.validation.suite import TaskSuite

    assets = Path(a.assets)
    tok = AutoTokenizer.from_pretrained(assets / "tokenizer")
    texts = read_texts(assets / "heldout.jsonl")
    folder = task_folder(assets / "tasks", Path(tempfile.mkdtemp(prefix="qp-tasks-")))
    s = EvalSettings(ppl_max_tokens=a.stage_ppl_tokens, ppl_window=a.window, num_prompts=a.stage_prompts,
                     max_new_tokens=a.new_tokens, task_limit=a.task_limit, tasks=tuple(a.tasks.split(",")))
    tasks = TaskSuite(folders=(folder,), names=s.tasks, limit=s.task_limit)
    counter = Counter()
    counter.install()
    counter.timing = not placement.overlap
    small = s.model_copy(update={"ppl_max_tokens": 256, "task_limit": 2, "num_prompts": 2, "max_new_tokens": 4})
    measure_loaded(model, tok, texts, small, TaskSuite(folders=(folder,), names=s.tasks, limit=2), None,
                   placement)  # warm-up (lm-eval imports, graphs)
    counter.reset()
    base, tb = timed(lambda: measure_loaded(model, tok, texts, s, tasks, None, placement))
    useful_base = dict(counter.tokens)
    counter.reset()
    cand, tc = timed(lambda: measure_loaded(model, tok, texts, s, tasks, base["dist"], placement))
    useful = sum(counter.tokens.values())
    tokens = dict(counter.tokens)
    roof = res["roofline_tok_s"]
    out = {"settings": s.model_dump(), "engine": cand["engine"], "overlap": placement.overlap, "useful_tokens": tokens,
           "seconds": round(tc, 3), "useful_tok_s": round(useful / tc),
           "pct_of_roofline": round(100 * useful / tc / roof, 1),
           "with_baseline_seconds": round(tb + tc, 3),
           "with_baseline_pct_of_roofline": round(100 * (useful + sum(useful_base.values())) / (tb + tc) / roof, 1),
           "tasks": {k: {"score": v["score"], "n": v["n"]} for k, v in cand.get("accuracy", {}).get("tasks", {}).items()},
           "candidate_vs_baseline": {"kl_mean": cand["perplexity"]["kl"]["mean"],
                                     "same_greedy_rows": sum(x["token_ids"] == y["token_ids"] for x, y in
                                                             zip(base["generations"], cand["generations"]))}}
    # the same candidate pass one part after another: where the time goes, and the same figures
    seq = dataclasses.replace(placement, overlap=False)
    counter.timing = True
    counter.reset()
    one, ts = timed(lambda: measure_loaded(model, tok, texts, s, tasks, base["dist"], seq))
    ppl_s = one["perplexity"]["seconds"]
    acc_s = one.get("accuracy", {}).get("seconds", 0.0)
    items = [(a, b) for k in one.get("accuracy", {}).get("tasks", {})
             for a, b in zip(one["accuracy"]["tasks"][k]["per_item"], cand["accuracy"]["tasks"][k]["per_item"])]
    out["sequential"] = {
        "seconds": round(ts, 3), "pct_of_roofline": round(100 * useful / ts / roof, 1),
        "breakdown_s": {"perplexity_kl": ppl_s, "lm_eval_tasks": acc_s, "greedy_and_rest": round(ts - ppl_s - acc_s, 3),
                        "engine_loglikelihood": round(counter.seconds["loglikelihood"], 3),
                        "engine_generation_all": round(counter.seconds["generation"], 3)},
        "engine_calls": counter.calls,
        "same_as_overlapped": {
            "perplexity_rel_diff": abs(one["perplexity"]["perplexity"] / cand["perplexity"]["perplexity"] - 1),
            "task_items_equal": f"{sum(a == b for a, b in items)}/{len(items)}",
            "greedy_rows_equal": f"{sum(x['token_ids'] == y['token_ids'] for x, y in zip(one['generations'], cand['generations']))}/{len(one['generations'])}"}}
    res["stage"] = out


def main() -> None:
    import torch
    from transformers import LlamaForCausalLM

    from quantpipe.validation.engine.placement import resolve_placement

    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--mc", type=int, default=1000)
    p.add_argument("--mc-naive", type=int, default=100, help="requests timed on the naive path")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--gen-naive", type=int, default=4, help="prompts timed on the naive path")
    p.add_argument("--matmul-n", type=int, default=8192)
    p.add_argument("--assets", default=None, help="tokenizer/, heldout.jsonl, tasks/ for the stage pass")
    p.add_argument("--stage-ppl-tokens", type=int, default=65536)
    p.add_argument("--stage-prompts", type=int, default=16)
    p.add_argument("--task-limit", type=int, default=200)
    p.add_argument("--tasks", default="qp_piqa,qp_siqa,qp_openbookqa,qp_asdiv")
    p.add_argument("--skip-parts", action="store_true")
    a = p.parse_args()

    placement = resolve_placement()
    dev = placement.device
    tf = matmul_tflops(dev, a.matmul_n)
    torch.manual_seed(0)
    cfg = llama_config(a.shape, a.layers, a.vocab)
    torch.set_default_dtype(placement.torch_dtype)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.eval()
    n_mm = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    res: dict = {"bench": "gpu_validation", "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                 "placement": placement.__dict__, "layers": a.layers, "matmul_params": n_mm,
                 "matmul_tflops_bf16": round(tf, 1), "roofline_tok_s": round(tf * 1e12 / (2 * n_mm))}
    from quantpipe.validation.engine.attention import attention_kernels

    if not a.skip_parts:
        with attention_kernels(placement):  # as measure_loaded runs them
            parts(model, placement, a, res)
    if a.assets:
        stage(model, placement, a, res)
    if dev == "cuda" and placement.cuda_graph:
        graph_check(res)
    if dev == "cuda":
        res["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
