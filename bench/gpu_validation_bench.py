"""Validation-stage throughput on a GPU, against the bf16 matmul roofline of the same run.

A LlamaForCausalLM with Llama-3-8B shapes and random bf16 weights (32 layers by default:
16 GB fits an H100) runs the three kinds of work of the validation stage:

  ppl  perplexity over 2048-token windows (batch 1 as the naive path, batch 4 tuned)
  mc   log-likelihood of many short multiple-choice requests (~100 tokens): naive = one
       request per forward with logits at every position; tuned = sorted by length,
       right-padded batches under a token budget (no mask needed: causal attention never
       looks at the padding after a row's end), lm_head only at continuation positions
  gen  greedy generation with KV cache: naive = one prompt at a time; tuned = all prompts
       in one left-padded batch

Useful tokens = tokens of the requests (never padding) + generated tokens. The whole
validation pass counts the quantized model's ppl + mc + gen with one model load; the
baseline's results come from the cache keyed by checkpoint hash, so it costs nothing on a
re-run (the figure without the cache is printed too). Roofline tokens/s = measured bf16
matmul TFLOP/s / (2 x matmul params per token). Prints one JSON line.

  python bench/gpu_validation_bench.py --layers 32
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

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


def ppl_pass(model, windows, batch: int) -> tuple[float, int]:
    import torch
    import torch.nn.functional as F

    nll, count = 0.0, 0
    for i in range(0, len(windows), batch):
        ids = windows[i:i + batch]
        h = model.model(input_ids=ids).last_hidden_state
        for r in range(ids.shape[0]):
            logits = model.lm_head(h[r, :-1]).float()
            nll += F.cross_entropy(logits, ids[r, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    return nll / count, count


def mc_naive(model, reqs, dev) -> list[float]:
    import torch

    out = []
    for ctx, cont in reqs:
        ids = torch.tensor([ctx + cont], device=dev)
        logits = model(input_ids=ids).logits[0].float()
        lp = torch.log_softmax(logits[len(ctx) - 1:-1], -1)
        out.append(lp.gather(1, ids[0, len(ctx):, None]).sum().item())
    return out


def mc_batched(model, reqs, dev, token_budget: int) -> list[float]:
    import torch

    order = sorted(range(len(reqs)), key=lambda i: -len(reqs[i][0]) - len(reqs[i][1]))
    res = [0.0] * len(reqs)
    i = 0
    while i < len(order):
        width = len(reqs[order[i]][0]) + len(reqs[order[i]][1])
        n = max(1, token_budget // width)
        chunk = order[i:i + n]
        i += n
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        rows, cols, tgt, owner = [], [], [], []
        for r, k in enumerate(chunk):
            ctx, cont = reqs[k]
            seq = ctx + cont
            ids[r, :len(seq)] = torch.tensor(seq)
            for j in range(len(cont)):
                rows.append(r)
                cols.append(len(ctx) - 1 + j)
                tgt.append(cont[j])
                owner.append(r)
        ids = ids.to(dev, non_blocking=True)
        h = model.model(input_ids=ids).last_hidden_state
        sel = h[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)]
        lp = torch.log_softmax(model.lm_head(sel).float(), -1)
        tok_lp = lp.gather(1, torch.tensor(tgt, device=dev)[:, None])[:, 0]
        sums = torch.zeros(len(chunk), device=dev).index_add_(0, torch.tensor(owner, device=dev), tok_lp)
        for r, k in enumerate(chunk):
            res[k] = sums[r].item()
    return res


def gen_naive(model, prompts, new: int, dev):
    import torch

    outs = []
    for p in prompts:
        ids = torch.tensor([p], device=dev)
        o = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=0)
        outs.append(o[0, len(p):].tolist())
    return outs


def gen_batched(model, prompts, new: int, dev):
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    o = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=new,
                       min_new_tokens=new, do_sample=False, pad_token_id=0)
    return [row[width:].tolist() for row in o]


def gen_static(model, prompts, new: int, dev, graph: bool, force=None):
    """Greedy decoding with a static KV cache and a 4-D boolean mask built on the device, so
    that one decode step can be captured once as a CUDA graph and replayed (no per-step
    Python and kernel-launch cost). ``graph=False`` runs the same steps eagerly."""
    import torch
    from transformers import StaticCache

    B, width = len(prompts), max(len(p) for p in prompts)
    L = width + new
    ids = torch.zeros((B, width), dtype=torch.long)
    pad = torch.zeros((B, L), dtype=torch.bool)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        pad[r, width - len(p):] = True
    ids, pad = ids.to(dev), pad.to(dev)
    pad[:, width:] = True
    ar = torch.arange(L, device=dev)
    start = (~pad[:, :width]).sum(-1)  # left padding per row
    cache = StaticCache(config=model.config, max_cache_len=L)
    q = torch.arange(width, device=dev)
    m4 = pad[:, None, None, :] & (ar[None, None, None, :] <= q[None, None, :, None])
    pos = (q[None, :] - start[:, None]).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=m4, position_ids=pos, cache_position=q,
                   past_key_values=cache).logits[:, -1]
    tok = logits.argmax(-1, keepdim=True)
    out = [tok.clone()]
    cpos = torch.tensor([width], device=dev)
    ppos = (width - start)[:, None].clone()

    def step():
        mask = pad[:, None, None, :] & (ar[None, None, None, :] <= cpos)
        lg = model(input_ids=tok, attention_mask=mask, position_ids=ppos, cache_position=cpos,
                   past_key_values=cache).logits[:, -1]
        return lg.argmax(-1, keepdim=True), lg

    g = None
    if graph and dev == "cuda":
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                step()  # writes slot `width` with the right token; replays rewrite it
        torch.cuda.current_stream().wait_stream(s)
        # the static cache counts its own write position (cumulative_length, a device
        # tensor advanced in place by each update): undo the warm-ups' advances; each replay
        # then advances it by one, in step with cpos
        for layer in cache.layers:
            layer.cumulative_length.fill_(width)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, capture_error_mode="thread_local"):
            nxt_static, lg_static = step()
    if force is not None:  # teacher forcing: feed the given tokens, return every step's logits
        tok.copy_(torch.tensor([[r[0]] for r in force], device=dev))
        logs = [logits.float()]
    for t in range(new - 1):
        if g is not None:
            g.replay()
            nxt, lg = nxt_static.clone(), lg_static
        else:
            nxt, lg = step()
        if force is not None:
            logs.append(lg.float().clone())
            nxt = torch.tensor([[r[t + 1]] for r in force], device=dev)
        tok.copy_(nxt)
        cpos += 1
        ppos += 1
        out.append(nxt)
    if force is not None:
        return torch.stack(logs)
    return [row.tolist() for row in torch.cat(out, 1)]


def overlapped_pass(model, windows, reqs, prompts, a, dev, graph: bool = False) -> float:
    """ppl + mc on the default stream while greedy decoding runs in a second thread on its
    own CUDA stream: decoding at batch 32 is bound by Python and kernel launches (~34 ms a
    step on the H100 for ~6 ms of GPU work), so its steps fill gaps between the big GEMMs."""
    import threading

    import torch

    box: dict = {}

    def worker():
        try:
            with torch.inference_mode():
                if dev == "cuda":
                    s2 = torch.cuda.Stream()
                    with torch.cuda.stream(s2):
                        box["gen"] = gen_static(model, prompts, a.new_tokens, dev, graph)
                        s2.synchronize()
                else:
                    box["gen"] = gen_static(model, prompts, a.new_tokens, dev, False)
        except Exception as e:  # reported by the caller
            box["error"] = e

    sync()
    t = time.perf_counter()
    th = threading.Thread(target=worker)
    th.start()
    with torch.inference_mode():
        ppl_pass(model, windows, a.ppl_batch)
        mc_batched(model, reqs, dev, a.mc_token_budget)
    th.join()
    sync()
    if "error" in box:
        raise box["error"]
    return time.perf_counter() - t


def gen_tokens_of(plens, a) -> int:
    return sum(plens) + a.prompts * a.new_tokens


def main() -> None:
    import torch
    from transformers import LlamaForCausalLM

    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--ppl-batch", type=int, default=4)
    p.add_argument("--mc", type=int, default=1000)
    p.add_argument("--mc-naive", type=int, default=100, help="requests timed on the naive path")
    p.add_argument("--mc-token-budget", type=int, default=32768)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--gen-naive", type=int, default=4, help="prompts timed on the naive path")
    p.add_argument("--matmul-n", type=int, default=8192)
    p.add_argument("--try-graph", action="store_true",
                   help="also try a CUDA-graph decode step (failed with a device-side assert on 2026-11-24)")
    a = p.parse_args()

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    tf = matmul_tflops(dev, a.matmul_n)
    torch.manual_seed(0)
    cfg = llama_config(a.shape, a.layers, a.vocab)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.eval()
    n_mm = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    n_all = sum(x.numel() for x in model.parameters())
    roof = tf * 1e12 / (2 * n_mm)

    g = torch.Generator().manual_seed(1)
    V = a.vocab
    windows = torch.randint(0, V, (a.windows, a.window), generator=g).to(dev)
    lens = torch.randint(40, 121, (a.mc,), generator=g).tolist()
    conts = torch.randint(1, 21, (a.mc,), generator=g).tolist()
    reqs = [(torch.randint(0, V, (c,), generator=g).tolist(), torch.randint(0, V, (k,), generator=g).tolist())
            for c, k in zip(lens, conts)]
    plens = torch.randint(32, 97, (a.prompts,), generator=g).tolist()
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in plens]

    res: dict = {"bench": "gpu_validation", "device": torch.cuda.get_device_name() if cuda else "cpu",
                 "layers": a.layers, "matmul_params": n_mm, "all_params": n_all,
                 "matmul_tflops_bf16": round(tf, 1), "roofline_tok_s": round(roof)}
    with torch.inference_mode():
        # warm-up of every path
        ppl_pass(model, windows[:1], 1)
        mc_batched(model, reqs[:8], dev, a.mc_token_budget)
        mc_naive(model, reqs[:2], dev)
        gen_batched(model, prompts[:2], 4, dev)

        (ppl1, n1), t1 = timed(lambda: ppl_pass(model, windows[:8], 1))
        (pplb, nb), tb = timed(lambda: ppl_pass(model, windows, a.ppl_batch))
        res["ppl"] = {"naive_b1_tok_s": round(8 * a.window / t1), "tuned_tok_s": round(a.windows * a.window / tb),
                      "batch": a.ppl_batch, "tokens": a.windows * a.window, "tuned_s": round(tb, 3)}

        mc_tokens = sum(len(c) + len(k) for c, k in reqs)
        naive_lp, tn = timed(lambda: mc_naive(model, reqs[:a.mc_naive], dev))
        naive_tokens = sum(len(c) + len(k) for c, k in reqs[:a.mc_naive])
        tuned_lp, tm = timed(lambda: mc_batched(model, reqs, dev, a.mc_token_budget))
        diff = max(abs(x - y) for x, y in zip(naive_lp, tuned_lp[:a.mc_naive]))
        res["mc"] = {"requests": a.mc, "tokens": mc_tokens, "naive_tok_s": round(naive_tokens / tn),
                     "tuned_tok_s": round(mc_tokens / tm), "tuned_s": round(tm, 3),
                     "max_abs_loglik_diff_vs_naive": round(diff, 4), "token_budget": a.mc_token_budget}

        gen_tokens = gen_tokens_of(plens, a)
        gn, tgn = timed(lambda: gen_naive(model, prompts[:a.gen_naive], a.new_tokens, dev))
        gb, tgb = timed(lambda: gen_batched(model, prompts, a.new_tokens, dev))
        naive_gen_tokens = sum(plens[:a.gen_naive]) + a.gen_naive * a.new_tokens
        same = sum(x == y for x, y in zip(gn, gb[:a.gen_naive]))
        gen_extra = {}
        best_t, best_out = tgb, gb
        eager_out = None
        for name, graph in (("static_eager", False),) + ((("static_cuda_graph", True),) if a.try_graph else ()):
            try:
                gen_static(model, prompts[:2], 4, dev, graph)  # warm-up
                gs, tgs = timed(lambda: gen_static(model, prompts, a.new_tokens, dev, graph))
                agree = sum(sum(x == y for x, y in zip(r1, r2)) for r1, r2 in zip(gs, gb))
                if eager_out is None:
                    eager_out = gs
                same_eager = sum(r1 == r2 for r1, r2 in zip(gs, eager_out))
                gen_extra[name] = {"tok_s": round(gen_tokens_of(plens, a) / tgs), "s": round(tgs, 3),
                                   "token_agreement_vs_generate": round(agree / (a.prompts * a.new_tokens), 3),
                                   "rows_same_as_static_eager": f"{same_eager}/{a.prompts}"}
                if tgs < best_t:
                    best_t, best_out = tgs, gs
            except Exception as e:
                gen_extra[name] = {"error": repr(e)[:300]}
        tgb_hf, tgb = tgb, best_t
        if "s" in gen_extra.get("static_cuda_graph", {}) and eager_out is not None:
            # same forced tokens through both paths: logits must agree to bf16 rounding
            le = gen_static(model, prompts, a.new_tokens, dev, False, force=eager_out)
            lgr = gen_static(model, prompts, a.new_tokens, dev, True, force=eager_out)
            gen_extra["graph_vs_eager_forced_logits_rel_diff"] = float(f"{((lgr - le).norm() / le.norm()).item():.2e}")
            gen_extra["graph_vs_eager_forced_argmax_agreement"] = round(
                (lgr.argmax(-1) == le.argmax(-1)).float().mean().item(), 4)
        res["gen"] = {"prompts": a.prompts, "new_tokens": a.new_tokens, "tokens": gen_tokens,
                      "naive_tok_s": round(naive_gen_tokens / tgn), "tuned_tok_s": round(gen_tokens / tgb),
                      "hf_generate_s": round(tgb_hf, 3), "tuned_s": round(tgb, 3),
                      "decode_ms_per_step": round(1000 * tgb / a.new_tokens, 2), **gen_extra,
                      "greedy_same_as_naive": f"{same}/{a.gen_naive}"}

    total_tokens = a.windows * a.window + mc_tokens + gen_tokens
    t_tuned = tb + tm + tgb
    t_naive = (a.windows * a.window) / (8 * a.window / t1) + mc_tokens / (naive_tokens / tn) \
        + a.prompts * (tgn / a.gen_naive)
    useful = total_tokens / t_tuned
    res["whole_pass"] = {
        "tokens": total_tokens, "seconds": round(t_tuned, 3), "useful_tok_s": round(useful),
        "pct_of_roofline": round(100 * useful / roof, 1),
        "pct_without_baseline_cache": round(100 * useful / 2 / roof, 1),
        "naive_seconds_est": round(t_naive, 2), "naive_pct_of_roofline": round(100 * total_tokens / t_naive / roof, 1),
        "share_of_time": {"ppl": round(tb / t_tuned, 3), "mc": round(tm / t_tuned, 3), "gen": round(tgb / t_tuned, 3)},
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else 0.0,
    }
    try:
        use_graph = "s" in res["gen"].get("static_cuda_graph", {})
        t_ov = overlapped_pass(model, windows, reqs, prompts, a, dev, use_graph)
        res["whole_pass_overlapped"] = {
            "seconds": round(t_ov, 3), "useful_tok_s": round(total_tokens / t_ov),
            "pct_of_roofline": round(100 * total_tokens / t_ov / roof, 1),
            "pct_without_baseline_cache": round(100 * total_tokens / t_ov / 2 / roof, 1),
            "decode": "cuda_graph" if use_graph else "static_eager"}
    except Exception as e:
        res["whole_pass_overlapped"] = {"error": repr(e)[:300]}
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
