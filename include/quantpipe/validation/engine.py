"""Batched evaluation engine: the few big forwards that the validation stage's work becomes.

Three kinds of work, each batched so that a GPU spends its time in large matmuls:

* ``window_batches``: perplexity windows of equal length, ``ppl_batch`` per forward.
* ``loglikelihoods``: many short (context, continuation) requests (multiple choice,
  few-shot). Packed several to a row (first-fit by decreasing length; a block-diagonal
  causal mask and positions restarting at each request keep them apart), rows batched under
  a token budget, and the output projection only at the continuation positions. Without
  packing: sorted by length and right-padded, no mask.
* ``greedy``: greedy decoding of all prompts at once, left-padded, with a static KV cache
  and a 4-D mask built on the device; on CUDA one decode step is captured as a CUDA graph
  and replayed (no Python or launch cost per step). Falls back to eager steps if capture
  fails.

On CPU the same code runs in float32 with the placement's CPU batch sizes. Which device,
dtype and batch sizes: ``settings.EvalEngine`` (from the worker's environment).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Sequence

from ..settings import EvalEngine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """Where and how a model is evaluated on this worker."""

    device: str  # "cpu" or "cuda"
    dtype: str  # "float32" or "bfloat16"
    ppl_batch: int
    token_budget: int
    gen_batch: int
    cuda_graph: bool
    overlap: bool = False
    pack_width: int = 0

    @property
    def kind(self) -> str:
        """What changes the figures (device and dtype), not how fast they come."""
        return f"{self.device}-{self.dtype}"

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


def resolve_placement(e: EvalEngine | None = None) -> Placement:
    """``auto``: CUDA in bfloat16 when a GPU is visible, else CPU in float32 and batch 1
    perplexity windows (a CPU gains nothing from batching and pays memory for it)."""
    import torch

    e = e or EvalEngine.from_env()
    cuda = torch.cuda.is_available()
    if e.device == "cuda" and not cuda:
        raise RuntimeError("QUANTPIPE_EVAL_DEVICE=cuda but no CUDA device is visible on this worker")
    on_gpu = e.device == "cuda" or (e.device == "auto" and cuda)
    if on_gpu:
        return Placement("cuda", "bfloat16", e.ppl_batch, e.token_budget, e.gen_batch, e.cuda_graph, e.overlap,
                         e.pack_width)
    return Placement("cpu", "float32", 1, e.cpu_token_budget, e.gen_batch, False, pack_width=e.pack_width)


def overlapped(main, side):
    """Run ``side`` in a second thread on its own CUDA stream while ``main`` runs here: the
    decode steps and lm-eval's Python work (building, tokenizing and scoring requests) fill
    the gaps of the perplexity pass's large GEMMs. Returns (main(), side())."""
    import threading

    import torch

    box: dict = {}

    def worker():
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.inference_mode(), torch.cuda.stream(stream):
                box["side"] = side()
                stream.synchronize()
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    th = threading.Thread(target=worker, name="quantpipe-eval-side")
    th.start()
    try:
        first = main()
    finally:
        th.join()
    torch.cuda.synchronize()
    if "error" in box:
        raise box["error"]
    return first, box["side"]


def parts(model):
    """(decoder body returning hidden states, output projection) of a causal LM."""
    return model.get_decoder(), model.get_output_embeddings()


def device_of(model):
    return next(model.parameters()).device


def window_batches(windows: Sequence[Sequence[int]], batch: int) -> Iterator[list[Sequence[int]]]:
    """Consecutive windows of equal length, at most ``batch`` per group, order kept."""
    group: list[Sequence[int]] = []
    for w in windows:
        if group and (len(group) == batch or len(w) != len(group[0])):
            yield group
            group = []
        group.append(w)
    if group:
        yield group


def pack_rows(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Indices grouped into rows of at most ``width`` positions: first fit, longest first
    (a request longer than ``width`` gets a row of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[int] = []
    open_rows: list[int] = []  # rows that can still take the shortest request
    shortest = lengths[order[-1]] if order else 0
    for i in order:
        n = lengths[i]
        for r in open_rows:
            if free[r] >= n:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(width - n)
            open_rows.append(len(rows) - 1)
        if len(open_rows) > 64:
            open_rows = [r for r in open_rows if free[r] >= shortest]
    return rows


def loglikelihoods(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                   token_budget: int, pack: int = 0) -> list[tuple[float, bool]]:
    """Sum of log p(continuation | context) and whether the continuation is the greedy one,
    for each (context ids, continuation ids); both non-empty, the caller truncates.
    ``pack`` > 0: requests share rows of ``max(pack, longest)`` positions."""
    import torch

    dev = device_of(model)
    body, head = parts(model)
    lengths = [len(c) + len(k) - 1 for c, k in requests]
    res: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    if not requests:
        return res
    if pack:
        width = max(pack, max(lengths))
        rows = pack_rows(lengths, width)
    else:
        width = 0
        rows = [[i] for i in sorted(range(len(requests)), key=lambda i: -lengths[i])]
    i = 0
    with torch.inference_mode():
        while i < len(rows):
            w = width or lengths[rows[i][0]]
            chunk = rows[i:i + max(1, token_budget // max(w, 1))]
            i += len(chunk)
            ids = torch.zeros((len(chunk), w), dtype=torch.long)
            seg = torch.full((len(chunk), w), -1, dtype=torch.long)
            pos = torch.zeros((len(chunk), w), dtype=torch.long)
            keys, rows_i, cols, tgt, who = [], [], [], [], []
            for r, row in enumerate(chunk):
                off = 0
                for j, k in enumerate(row):
                    ctx, cont = requests[k]
                    n = lengths[k]
                    ids[r, off:off + n] = torch.tensor((list(ctx) + list(cont))[:-1])
                    seg[r, off:off + n] = j
                    pos[r, off:off + n] = torch.arange(n)
                    start = off + len(ctx) - 1
                    rows_i.extend([r] * len(cont))
                    cols.extend(range(start, start + len(cont)))
                    tgt.extend(cont)
                    who.extend([len(keys)] * len(cont))
                    keys.append(k)
                    off += n
            if width:
                # a request attends to its own earlier positions only; the padding after the
                # last request of a row attends to earlier padding (never read, never NaN)
                seg, pos = seg.to(dev), pos.to(dev)
                ar = torch.arange(w, device=dev)
                mask = (seg[:, None, :, None] == seg[:, None, None, :]) & (ar[None, None, None, :] <= ar[None, None, :, None])
                h = body(input_ids=ids.to(dev), attention_mask=mask, position_ids=pos).last_hidden_state
            else:
                h = body(input_ids=ids.to(dev)).last_hidden_state
            rows_t, cols_t = torch.tensor(rows_i, device=dev), torch.tensor(cols, device=dev)
            logits = head(h[rows_t, cols_t])
            tgt_t = torch.tensor(tgt, device=dev)
            who_t = torch.tensor(who, device=dev)
            # log p(target) = logit - logsumexp, in float32, without materializing a
            # float32 copy of the whole [tokens, vocab] block twice (log_softmax + gather)
            tok_lp = logits.gather(1, tgt_t[:, None])[:, 0].float() - torch.logsumexp(logits.float(), -1)
            greedy_ok = (logits.argmax(-1) == tgt_t).float()
            sums = torch.zeros(len(keys), device=dev, dtype=torch.float64).index_add_(0, who_t, tok_lp.double())
            misses = torch.zeros(len(keys), device=dev).index_add_(0, who_t, 1 - greedy_ok)
            for k, lp, miss in zip(keys, sums.tolist(), misses.tolist()):
                res[k] = (lp, miss == 0)
    return res


def greedy(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int,
           cuda_graph: bool = False, stop_ids: Sequence[int] = ()) -> list[list[int]]:
    """Greedy continuation of every prompt (token ids), all rows in one left-padded batch.
    Each row is cut after its first token in ``stop_ids`` (kept, as HF ``generate`` keeps
    the EOS it stops on)."""
    import torch
    from transformers import StaticCache

    dev = device_of(model)
    B, width = len(prompts), max(len(p) for p in prompts)
    L = width + max_new_tokens
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    valid = torch.zeros((B, L), dtype=torch.bool)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(list(p))
        valid[r, width - len(p):] = True
    ids, valid = ids.to(dev), valid.to(dev)
    ar = torch.arange(L, device=dev)
    left = (~valid[:, :width]).sum(-1)
    cache = StaticCache(config=model.config, max_cache_len=L)
    q = torch.arange(width, device=dev)
    with torch.inference_mode():
        mask = valid[:, None, None, :] & (ar[None, None, None, :] <= q[None, None, :, None])
        pos = (q[None, :] - left[:, None]).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache_position=q,
                       past_key_values=cache, logits_to_keep=1).logits[:, -1]
        tok = logits.argmax(-1, keepdim=True)
        out = [tok.clone()]
        cpos = torch.tensor([width], device=dev)
        ppos = (width - left)[:, None].clone()

        def step():
            m = valid[:, None, None, :] & (ar[None, None, None, :] <= cpos)
            return model(input_ids=tok, attention_mask=m, position_ids=ppos, cache_position=cpos,
                         past_key_values=cache).logits[:, -1].argmax(-1, keepdim=True)

        graph = _capture(step, cache, width) if (cuda_graph and dev.type == "cuda" and max_new_tokens > 1) else None
        stop_t = torch.tensor(sorted(set(stop_ids)), device=dev, dtype=torch.long)
        done = torch.isin(tok[:, 0], stop_t) if len(stop_t) else None
        for t in range(max_new_tokens - 1):
            if done is not None and t % 16 == 15 and bool(done.all()):
                break  # every row has stopped: the rest would be cut anyway
            if graph is not None:
                graph[0].replay()
                nxt = graph[1].clone()
            else:
                nxt = step()
            tok.copy_(nxt)
            cpos += 1
            ppos += 1
            out.append(nxt)
            if done is not None:
                done |= torch.isin(nxt[:, 0], stop_t)
        rows = torch.cat(out, 1).tolist()
    stops = set(stop_ids)
    return [_cut(row, stops) for row in rows]


def _cut(row: list[int], stops: set[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in stops:
            return row[:i + 1]
    return row


def _capture(step, cache, width: int):
    """One decode step as a CUDA graph (the static cache's in-place write position is
    rewound after the warm-up steps), or None if this model/transformers cannot be captured."""
    import torch

    layers = getattr(cache, "layers", None) or []
    if not layers or not all(hasattr(layer, "cumulative_length") for layer in layers):
        log.info("CUDA graph decode not available for this cache; decoding eagerly")
        return None
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                step()  # both warm-ups write slot `width`; the replays rewrite it
        torch.cuda.current_stream().wait_stream(s)
        for layer in layers:
            layer.cumulative_length.fill_(width)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, capture_error_mode="thread_local"):
            nxt = step()
        return g, nxt
    except Exception as e:  # a model whose forward cannot be captured: same results, eagerly
        log.warning("CUDA graph capture failed (%s); decoding eagerly", str(e)[:200])
        for layer in layers:
            layer.cumulative_length.fill_(width)
        return None
