"""Divergence of the candidate from the baseline per slice of held-out positions.

A slice is a named subset of positions: every position of one text *domain* (prose,
math, code, structured output, chat, a user's domain), every position that reads or
predicts a token of one *token class*, or every position deep into its window
(``context:late``: a fault that grows with distance, such as a broken rotary scale). Damage confined to one capability hides in
the overall means (a broken digit embedding moves perplexity by a few percent) but
stands out in its slice.

Per slice, three measures of the candidate against the baseline:

- ``kl``: mean KL(baseline || candidate) of the next-token distributions;
- ``top1``: share of positions where both predict the same next token;
- ``flips``: share of the baseline's *confident* predictions (top-1 probability
  >= ``CONFIDENT``) that the candidate changes: sound quantization rarely flips a
  confident prediction, damage does;
- ``kl_excess`` and ``disagree_excess``: how far the slice's mean KL (or its top-1
  disagreement) exceeds ``ratio`` times that of the other positions (see ``_excess``). Sound quantization spreads its
  error over every slice; damage confined to one capability concentrates it there, so
  this catches a fault too small to cross an absolute limit on a model whose overall
  error is small.

Token classes are read off the tokenizer's vocabulary, so they work for any model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .stats import Estimate, block_ratio

TOKEN_CLASSES: tuple[str, ...] = ("digits", "operators", "punctuation", "whitespace", "special", "rare")
CONFIDENT = 0.5
BLOCK = 64  # positions per bootstrap block (consecutive positions of one window)
_OPS = set("+-*/=<>()[]{}%^&|!~:;@#$\\")
LATE_CONTEXT = 256  # positions at least this far into their window form the ``context:late`` slice
RARE_MAX_COUNT = 2  # a token seen at most this often in the reference text is rare


def token_class_table(tokenizer, reference_ids: list[int] | None = None) -> dict[str, np.ndarray]:
    """class -> boolean mask over the vocabulary. ``reference_ids``: token ids of a
    reference text (the calibration corpus) whose counts define ``rare``."""
    n = len(tokenizer)
    masks = {c: np.zeros(n, dtype=bool) for c in TOKEN_CLASSES}
    special = set(tokenizer.all_special_ids or [])
    for tid in (getattr(tokenizer, "added_tokens_decoder", None) or {}):
        tok = tokenizer.added_tokens_decoder[tid]
        if getattr(tok, "special", False):
            special.add(int(tid))
    if tokenizer.eos_token_id is not None:
        special.add(int(tokenizer.eos_token_id))
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    for i, piece in enumerate(pieces):
        if i in special:
            masks["special"][i] = True
            continue
        s = tokenizer.convert_tokens_to_string([piece]) if piece is not None else ""
        t = s.strip()
        if s and not t:
            masks["whitespace"][i] = True
        elif t and any(ch.isdigit() for ch in t) and all(ch.isdigit() or ch in ".,_" for ch in t):
            masks["digits"][i] = True
        elif t and all(ch in _OPS for ch in t):
            masks["operators"][i] = True
        elif t and all(not ch.isalnum() and not ch.isspace() for ch in t):
            masks["punctuation"][i] = True  # quotes, commas, full stops: the skeleton of JSON and prose
    if reference_ids is not None:
        counts = np.bincount(np.asarray(reference_ids, dtype=np.int64), minlength=n)[:n]
        masks["rare"] = (counts <= RARE_MAX_COUNT) & ~masks["special"]
    return masks


@dataclass
class Positions:
    """Per held-out position, aligned arrays (length P)."""

    target: np.ndarray  # token predicted
    source: np.ndarray  # token read
    domain: np.ndarray  # index into ``domains``
    block: np.ndarray  # bootstrap block id
    kl: np.ndarray
    nll_base: np.ndarray
    nll_cand: np.ndarray
    top1_base: np.ndarray
    top1_cand: np.ndarray
    p_top1_base: np.ndarray  # baseline's probability of its own top-1
    domains: list[str]
    offset: np.ndarray | None = None  # position within its window (how much context it has)

    @property
    def blocks(self) -> int:
        return int(self.block.max()) + 1 if len(self.block) else 0


def positions_from(ids: list[int], windows: list[tuple[int, int, str]], domains: list[str], base: dict,
                   cand: dict) -> Positions:
    """Lay out per-position arrays from the held-out ids, their windows ((start, length,
    domain) in ``ids``) and the two models' per-position outputs (same order)."""
    tgt, src, dom, blk, off = [], [], [], [], []
    b = 0
    for start, length, d in windows:
        w = np.asarray(ids[start:start + length], dtype=np.int64)
        n = len(w) - 1
        src.append(w[:-1])
        tgt.append(w[1:])
        dom.append(np.full(n, domains.index(d), dtype=np.int32))
        nb = (n + BLOCK - 1) // BLOCK
        blk.append(b + np.arange(n) // BLOCK)
        off.append(np.arange(n))
        b += nb
    arr = lambda x: np.asarray(x, dtype=np.float64)  # noqa: E731
    return Positions(target=np.concatenate(tgt), source=np.concatenate(src), domain=np.concatenate(dom),
                     block=np.concatenate(blk), kl=arr(cand["kl"]), nll_base=arr(base["nll"]),
                     nll_cand=arr(cand["nll"]), top1_base=np.asarray(base["top1"]),
                     top1_cand=np.asarray(cand["top1"]), p_top1_base=np.exp(arr(base["top1_logp"])),
                     domains=list(domains), offset=np.concatenate(off))


def slice_masks(pos: Positions, classes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Slice name -> mask over positions: ``all``, ``domain:<d>``, ``class:<c>`` (a position
    belongs to a class when it reads or predicts a token of it)."""
    out = {"all": np.ones(len(pos.target), dtype=bool)}
    for i, d in enumerate(pos.domains):
        out[f"domain:{d}"] = pos.domain == i
    for c, vocab in classes.items():
        out[f"class:{c}"] = vocab[pos.target] | vocab[pos.source]
    if pos.offset is not None and len(pos.offset):
        late = pos.offset >= LATE_CONTEXT
        if late.any() and not late.all():
            out["context:late"] = late
    return out


def _per_block(values: np.ndarray, mask: np.ndarray, block: np.ndarray, blocks: int) -> np.ndarray:
    return np.bincount(block[mask], weights=values[mask], minlength=blocks)


def _excess(values: np.ndarray, mask: np.ndarray, block: np.ndarray, nb: int, ratio: float,
            seed: int) -> Estimate | None:
    """Slice mean minus ``ratio`` x the mean of the *other* positions it is compared with.

    A token class is compared with the other positions of the same blocks (same domain,
    same windows), so a class that is simply harder to predict in hard text is not
    mistaken for damage. A domain (whose blocks hold nothing else) is compared with every
    other domain. The slice is never part of its own reference: a damaged class that makes
    up much of its text would otherwise raise the bar it is measured against.
    """
    rest = ~mask
    count = np.bincount(block[mask], minlength=nb).astype(np.float64)
    rest_count = np.bincount(block[rest], minlength=nb).astype(np.float64)
    units = (count > 0).astype(np.float64)
    if not (rest_count * units).any():  # a domain: its blocks hold only its own positions
        units = ((count + rest_count) > 0).astype(np.float64)
    rest_count = rest_count * units
    rows = np.stack([_per_block(values, mask, block, nb), count,
                     _per_block(values, rest, block, nb) * units, rest_count])
    if rest_count.sum() == 0:
        return None
    return block_ratio(rows, units, seed, transform=lambda r: r[0] / np.maximum(r[1], 1e-12) - ratio * r[2] / np.maximum(r[3], 1e-12))


def slice_estimates(pos: Positions, mask: np.ndarray, seed: int = 0, ratio: float = 3.0) -> dict[str, Estimate | None]:
    """kl, top1, flips, the concentration measures and the perplexity change (%) of one
    slice, each with its interval."""
    nb = pos.blocks
    count = np.bincount(pos.block[mask], minlength=nb).astype(np.float64)
    agree = (pos.top1_base == pos.top1_cand).astype(np.float64)
    conf = mask & (pos.p_top1_base >= CONFIDENT)
    flips = _per_block(1 - agree, conf, pos.block, nb)
    conf_count = np.bincount(pos.block[conf], minlength=nb).astype(np.float64)
    ppl = block_ratio(np.stack([_per_block(pos.nll_cand, mask, pos.block, nb),
                                _per_block(pos.nll_base, mask, pos.block, nb)]), count, seed,
                      transform=lambda r: (np.exp(r[0] - r[1]) - 1) * 100)
    concentration = {key: _excess(values, mask, pos.block, nb, ratio, seed)
                     for key, values in (("kl_excess", pos.kl), ("disagree_excess", 1 - agree))}
    return {**concentration, "kl": block_ratio(_per_block(pos.kl, mask, pos.block, nb), count, seed),
            "top1": block_ratio(_per_block(agree, mask, pos.block, nb), count, seed),
            "flips": block_ratio(flips, conf_count, seed),
            "ppl_pct": ppl}
