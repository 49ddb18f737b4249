"""Requests packed into few large forwards: perplexity windows in equal-length batches, and
(context, continuation) log-likelihood requests packed several to a row."""

from __future__ import annotations

from typing import Iterator, Sequence

from .placement import device_of, parts


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
