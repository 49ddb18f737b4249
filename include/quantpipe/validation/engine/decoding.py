"""Greedy decoding of many prompts at once: a shared prefix computed once, packed prefill into
a static KV cache, then one token for every row per step (a CUDA graph on CUDA)."""

from __future__ import annotations

from typing import Sequence

from .graphs import capture_step
from .packing import pack_rows
from .placement import device_of, parts


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

        graph = capture_step(step, cache, width) if (cuda_graph and dev.type == "cuda" and max_new_tokens > 1) else None
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
