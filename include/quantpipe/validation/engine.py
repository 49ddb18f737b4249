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
import threading
from contextlib import contextmanager
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
    shard_gpus: int = 1  # > 1: decoder layers split over this many GPUs (``sharding``)
    shard: str = "auto"  # EvalEngine.shard: when to split

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
                         e.pack_width, shard=e.shard)
    return Placement("cpu", "float32", 1, e.cpu_token_budget, e.gen_batch, False, pack_width=e.pack_width)


_streams: dict[tuple[str, int], object] = {}
_streams_lock = threading.Lock()
_capture_lock = threading.Lock()


def dedicated_stream(role: str, priority: int = 0, new=None):
    """The CUDA stream kept for ``role`` for the life of the process, its CUDA handle used
    by no other role. ``torch.cuda.Stream()`` hands out a round-robin pool (32 streams per
    priority), so streams made per call come to share handles: after enough evaluations
    lm-eval's side stream was the very stream a decode step was being captured on, and its
    host-to-device copies failed the capture ("Cannot copy between CPU and CUDA tensors
    during CUDA graph capture", seen on an H200), or would have been recorded into the graph.
    ``new(priority)`` makes a stream (tests pass a fake)."""
    if new is None:
        import torch

        def new(p):
            return torch.cuda.Stream(priority=p)

    with _streams_lock:
        key = (role, priority)
        if key not in _streams:
            taken = {s.cuda_stream for s in _streams.values()}
            for _ in range(1024):
                s = new(priority)
                if s.cuda_stream not in taken:
                    break
            else:
                raise RuntimeError(f"no CUDA stream of priority {priority} left that no other role uses")
            _streams[key] = s
        return _streams[key]


def overlapped(main, *sides, priorities: Sequence[int] = ()):
    """Run each of ``sides`` in its own thread on its own CUDA stream while ``main`` runs
    here: decode steps and lm-eval's Python work (building, tokenizing and scoring requests)
    fill the gaps of the perplexity pass's large GEMMs. ``priorities``: CUDA stream priority
    per side (-1: its kernels go first whenever SMs free up, for small latency-bound decode
    steps beside large GEMMs; 0: normal). Returns (main(), *sides())."""
    import torch

    boxes: list[dict] = [{} for _ in sides]
    prio = list(priorities) + [0] * (len(sides) - len(priorities))
    streams = [dedicated_stream(f"side-{i}", p) for i, p in enumerate(prio)]

    def worker(fn, box, stream):
        try:
            stream.wait_stream(torch.cuda.current_stream())
            with torch.inference_mode(), torch.cuda.stream(stream):
                box["out"] = fn()
                stream.synchronize()
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    threads = [threading.Thread(target=worker, args=(fn, box, st), name=f"quantpipe-eval-side-{i}")
               for i, (fn, box, st) in enumerate(zip(sides, boxes, streams))]
    for th in threads:
        th.start()
    try:
        first = main()
    finally:
        for th in threads:
            th.join()
    torch.cuda.synchronize()
    for box in boxes:
        if "error" in box:
            raise box["error"]
    return (first, *(box["out"] for box in boxes))


def grouped_query_sdpa(original):
    """``original`` (transformers' SDPA attention) for a grouped-query model given a mask,
    without copying the keys and values once per query head: the query heads that share a
    key/value head are folded into the query length (head ``k * g + j`` reads key/value head
    ``k``, as ``repeat_kv`` lays them out), the mask repeated along with them. Exactly the
    same attention. Without it, SDPA with a mask and GQA copies K and V ``g`` times per layer
    and step: measured on an H100, 14 ms of a 33 ms decode step at 200 rows."""
    import torch

    def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                  is_causal=None, position_bias=None, **kwargs):
        g = getattr(module, "num_key_value_groups", 1)
        if (g <= 1 or attention_mask is None or attention_mask.dim() != 4 or attention_mask.shape[1] != 1
                or position_bias is not None or kwargs.get("output_attentions")
                or query.shape[1] != key.shape[1] * g):
            return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                            is_causal=is_causal, position_bias=position_bias, **kwargs)
        B, H, Q, D = query.shape
        Hk, L = key.shape[1], key.shape[2]
        q = query.reshape(B, Hk, g * Q, D)
        m = attention_mask[:, :, :, :L]
        m = m[:, :, None].expand(m.shape[0], 1, g, Q, L).reshape(m.shape[0], 1, g * Q, L)
        out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=m, dropout_p=dropout,
                                                               scale=scaling)
        return out.reshape(B, H, Q, -1).transpose(1, 2).contiguous(), None

    return attention


@contextmanager
def attention_kernels(placement: Placement):
    """How the engine's forwards attend, while this is on (process-wide):

    * grouped-query models given a mask (packed rows, decoding) fold query heads instead of
      copying keys and values (``grouped_query_sdpa``), through transformers' own
      attention registry (a local override of "sdpa", removed on exit);
    * on CUDA, SDPA through FlashAttention, the memory-efficient kernel or plain math, not
      cuDNN: cuDNN builds an execution plan for every new shape, and every greedy batch and
      log-likelihood pass brings new shapes (measured on an H100: the first pass over 1,800
      packed requests took 3.48 s with cuDNN plans, 2.25 s again; 2.29 s the first time
      without)."""
    from contextlib import nullcontext

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    had_local = "sdpa" in ALL_ATTENTION_FUNCTIONS._local_mapping
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    ALL_ATTENTION_FUNCTIONS["sdpa"] = grouped_query_sdpa(original)
    if placement.device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernels = sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
    else:
        kernels = nullcontext()
    try:
        with kernels:
            yield
    finally:
        if had_local:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = original
        else:
            del ALL_ATTENTION_FUNCTIONS["sdpa"]


def parts(model):
    """(decoder body returning hidden states, output projection) of a causal LM."""
    return model.get_decoder(), model.get_output_embeddings()


def device_of(model):
    """Where inputs go and outputs come back: the input embeddings' device (on a model split
    over GPUs, ``sharding`` keeps embeddings, final norm and output head on that one GPU)."""
    return model.get_input_embeddings().weight.device


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
    res: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    if not requests:
        return res
    # the choices of a lettered item (MMLU: " A", " B", ...) share their context and are one token
    # each: the context runs once and every choice's token is read at its last position
    alts: dict[int, list[tuple[int, int]]] = {}
    first: dict[tuple, int] = {}
    for i, (c, k) in enumerate(requests):
        if len(k) == 1:
            j = first.setdefault(tuple(c), i)
            if j != i:
                alts.setdefault(j, []).append((i, k[0]))
    shared = {i for v in alts.values() for i, _ in v}
    order = [i for i in range(len(requests)) if i not in shared]
    requests = [requests[i] for i in order]
    alts = {n: alts.get(i, []) for n, i in enumerate(order)}
    lengths = [len(c) + len(k) - 1 for c, k in requests]
    if pack:
        width = max(max(lengths), min(pack, sum(lengths)))
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
                    keys.append(order[k])
                    for other, token in alts[k]:  # same context, another one-token choice
                        rows_i.append(r)
                        cols.append(start)
                        tgt.append(token)
                        who.append(len(keys))
                        keys.append(other)
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


def common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the prefix all prompts share, leaving every prompt at least one own token."""
    first = prompts[0]
    n = min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        i = 0
        while i < n and p[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def greedy(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int,
           cuda_graph: bool = False, stop_ids: Sequence[int] = (), token_budget: int = 32768,
           row: int = 1024) -> list[list[int]]:
    """Greedy continuation of every prompt (token ids), all rows decoded together.
    Each row is cut after its first token in ``stop_ids`` (kept, as HF ``generate`` keeps
    the EOS it stops on).

    Prefill (``_packed_prefill``): the prefix all prompts share is computed once per packed
    row of ``row`` positions, and the prompts' own tokens are packed behind it with no
    padding; the keys and values are then gathered into a static cache laid out per prompt
    as [shared prefix | own tokens, then unused slots | generated tokens]. Decoding: one
    token for every row per step, a 4-D mask hiding the unused slots."""
    import torch
    from transformers import StaticCache

    dev = device_of(model)
    B = len(prompts)
    P = common_prefix(prompts)
    own = [len(p) - P for p in prompts]
    width = P + max(own)
    L = width + max_new_tokens
    valid = torch.ones((B, L), dtype=torch.bool)
    for r, n in enumerate(own):
        valid[r, P + n:width] = False
    valid = valid.to(dev)
    ar = torch.arange(L, device=dev)
    with torch.inference_mode():
        cache = StaticCache(config=model.config, max_cache_len=L)
        tok = _packed_prefill(model, prompts, P, width, cache, token_budget, row)
        if tok is None:  # a cache this model's layers do not lay out as plain tensors
            cache = StaticCache(config=model.config, max_cache_len=L)
            tok = _padded_prefill(model, prompts, P, width, valid, cache)
        out = [tok.clone()]
        cpos = torch.tensor([width], device=dev)
        ppos = torch.tensor([len(p) for p in prompts], device=dev)[:, None]

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


def _packed_prefill(model, prompts, P: int, width: int, cache, token_budget: int, row: int):
    """Prefill without padding: rows of ``max(row, width)`` positions, each holding the shared
    prefix (``P`` tokens) and then as many prompts' own tokens as fit (block mask: a prompt
    sees the prefix and itself; positions continue after the prefix). Keys and values go
    into ``cache`` at each prompt's slots. Returns the first generated token of each prompt
    ([B, 1]), or None where the caches are not the plain layouts this relies on."""
    import torch
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, StaticLayer

    if not cache.layers or any(type(layer) is not StaticLayer for layer in cache.layers):
        return None
    dev = device_of(model)
    body, head = parts(model)
    B = len(prompts)
    own = [len(p) - P for p in prompts]
    R = max(width, min(row, P + sum(own)))  # a row no longer than everything needs
    rows = pack_rows(own, R - P)
    first = torch.zeros((B, 1), dtype=torch.long, device=dev)
    slots = torch.arange(width)
    per = max(1, token_budget // R)
    for c in range(0, len(rows), per):
        chunk = rows[c:c + per]
        ids = torch.zeros((len(chunk), R), dtype=torch.long)
        seg = torch.full((len(chunk), R), -1, dtype=torch.long)
        pos = torch.zeros((len(chunk), R), dtype=torch.long)
        who, last, src = [], [], []
        for r, members in enumerate(chunk):
            ids[r, :P] = torch.tensor(list(prompts[members[0]][:P]), dtype=torch.long)
            seg[r, :P] = 0
            pos[r, :P] = torch.arange(P)
            off = P
            for j, k in enumerate(members):
                n = own[k]
                ids[r, off:off + n] = torch.tensor(list(prompts[k][P:]), dtype=torch.long)
                seg[r, off:off + n] = j + 1
                pos[r, off:off + n] = torch.arange(P, P + n)
                # slot i of prompt k reads packed position: the prefix, then its own tokens
                idx = torch.where(slots < P, slots, (off - P + slots).clamp(max=off + n - 1))
                src.append(r * R + idx)
                who.append(k)
                last.append(r * R + off + n - 1)
                off += n
        seg, pos = seg.to(dev), pos.to(dev)
        ar = torch.arange(R, device=dev)
        causal = ar[None, None, None, :] <= ar[None, None, :, None]
        sq, sk = seg[:, None, :, None], seg[:, None, None, :]
        mask = causal & ((sq == sk) | ((sk == 0) & (sq > 0)))
        dyn = DynamicCache(config=model.config)
        h = body(input_ids=ids.to(dev), attention_mask=mask, position_ids=pos, past_key_values=dyn,
                 use_cache=True).last_hidden_state
        if any(type(layer) is not DynamicLayer for layer in dyn.layers):
            return None
        who_t = torch.tensor(who, device=dev)
        first[who_t, 0] = head(h.reshape(-1, h.shape[-1])[torch.tensor(last, device=dev)]).argmax(-1)
        src_t = torch.stack(src).to(dev)  # [prompts in chunk, width]
        for dst, layer in zip(cache.layers, dyn.layers):
            for name in ("keys", "values"):
                t = getattr(layer, name)  # [rows, heads, R, dim]
                flat = t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3])  # [rows * R, heads, dim]
                got = flat[src_t].transpose(1, 2)  # [prompts, heads, width, dim]
                if not dst.is_initialized:
                    shape = (B, got.shape[1], 1, got.shape[3])
                    dst.lazy_initialization(got.new_empty(shape), got.new_empty(shape))
                getattr(dst, name)[who_t, :, :width] = got
        del dyn, h
    for layer in cache.layers:
        layer.cumulative_length.fill_(width)
    return first


def _padded_prefill(model, prompts, P: int, width: int, valid, cache):
    """Prefill of every prompt at once in the same slot layout (own tokens right-padded after
    the prefix): the general path, for caches ``_packed_prefill`` cannot fill."""
    import torch

    dev = device_of(model)
    B = len(prompts)
    ids = torch.zeros((B, width), dtype=torch.long)
    pos = torch.zeros((B, width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, :len(p)] = torch.tensor(list(p), dtype=torch.long)
        pos[r, :len(p)] = torch.arange(len(p))
        pos[r, len(p):] = len(p) - 1
    q = torch.arange(width, device=dev)
    ar = torch.arange(valid.shape[1], device=dev)
    mask = valid[:, None, None, :] & (ar[None, None, None, :] <= q[None, None, :, None])
    mask = mask | (ar[None, None, None, :] == q[None, None, :, None])  # unused slots see themselves
    body, head = parts(model)
    h = body(input_ids=ids.to(dev), attention_mask=mask, position_ids=pos.to(dev), cache_position=q,
             past_key_values=cache).last_hidden_state
    last = torch.tensor([len(p) - 1 for p in prompts], device=dev)
    return head(h[torch.arange(B, device=dev), last]).argmax(-1, keepdim=True)


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
    # one capture at a time (the consistency prompts and lm-eval's generations decode in two
    # threads), each on a stream of its caller's own
    with _capture_lock:
        try:
            # warm-up and capture on a stream of this caller's own (keyed by the caller's current
            # stream: main thread or a side role), on which no other thread's work runs
            s = dedicated_stream(f"graph-capture-for-{torch.cuda.current_stream().cuda_stream}")
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    step()  # both warm-ups write slot `width`; the replays rewrite it
            torch.cuda.current_stream().wait_stream(s)
            for layer in layers:
                layer.cumulative_length.fill_(width)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=s, capture_error_mode="thread_local"):
                nxt = step()
            return g, nxt
        except Exception as e:  # a model whose forward cannot be captured: same results, eagerly
            log.warning("CUDA graph capture failed (%s); decoding eagerly", str(e)[:200])
            for layer in layers:
                layer.cumulative_length.fill_(width)
            return None
