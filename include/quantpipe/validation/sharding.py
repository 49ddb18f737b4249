"""A model larger than one GPU, evaluated split over the worker's GPUs (a pipeline split).

The decoder layers are cut into contiguous runs, one run per GPU, in layer order; the
input embeddings, the final norm, the rotary tables and the output head stay on the first
GPU, so every tensor the engine reads (logits, hidden states, references) is on one device
and accelerate's hooks move the hidden state between GPUs at the cuts. The arithmetic is
that of one GPU: baseline and candidate are measured the same way whatever the split.
CUDA graphs and the overlap of streams are single-device features: a split model runs
without them.

``auto`` splits only when the dense bf16 weights with their evaluation reserve do not fit
the first GPU's free memory, over as few GPUs as hold them; ``always`` uses every GPU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from .engine.placement import Placement

log = logging.getLogger(__name__)
GIB = 1024 ** 3
RESERVE_FRAC = 0.25  # KV caches, logits, activations of a batch: a quarter over the weights
RESERVE_MIN = 8 * GIB
SHARED_ON_FIRST = ("model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head")


class ShardingError(RuntimeError):
    """The model cannot be placed on this worker's GPUs."""


def dense_bytes(config: dict, dtype_bytes: int = 2) -> int:
    """Weights of a Llama-family decoder once loaded dense (compressed-tensors checkpoints are
    decompressed for evaluation), from its config alone."""
    h, i, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or h // heads
    attn = h * heads * head_dim * 2 + h * kv * head_dim * 2
    per_layer = attn + 3 * h * i + 2 * h
    embed = config["vocab_size"] * h * (1 if config.get("tie_word_embeddings") else 2)
    return (n * per_layer + embed + h) * dtype_bytes


def gpus_needed(weights: int, free: list[int]) -> int:
    """How many GPUs (from the first) hold ``weights`` plus the reserve; 0 when all do not."""
    need = weights + max(RESERVE_MIN, int(RESERVE_FRAC * weights))
    total = 0
    for k, f in enumerate(free, start=1):
        total += f
        if total >= need + (k - 1) * RESERVE_MIN:  # every GPU of a split keeps its own reserve
            return k
    return 0


def device_map(num_layers: int, gpus: int) -> dict[str, int]:
    """Contiguous layer runs of (nearly) equal length; shared modules on GPU 0."""
    out = {name: 0 for name in SHARED_ON_FIRST}
    for layer in range(num_layers):
        out[f"model.layers.{layer}"] = layer * gpus // num_layers
    return out


def _free_memory() -> list[int]:
    import torch

    return [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]


def placed(path: Path, placement: Placement, free: list[int] | None = None) -> Placement:
    """``placement`` with its split decided for the checkpoint at ``path`` (idempotent)."""
    if placement.device != "cuda" or placement.shard == "never" or placement.shard_gpus > 1:
        return placement
    config = json.loads((Path(path) / "config.json").read_text())
    free = _free_memory() if free is None else free
    weights = dense_bytes(config, 2 if placement.dtype in ("bfloat16", "float16") else 4)
    if placement.shard == "always":
        k = len(free)
    else:
        k = gpus_needed(weights, free)
        if k == 0:
            raise ShardingError(
                f"{Path(path).name}: {weights / GIB:.1f} GiB of dense weights (+ evaluation reserve) do not fit "
                f"the {len(free)} GPU(s) of this worker ({sum(free) / GIB:.1f} GiB free in all)")
    if k <= 1:
        return placement
    log.info("evaluation split over %d GPUs: %.1f GiB of weights, %s GiB free", k, weights / GIB,
             [round(f / GIB, 1) for f in free])
    return dataclasses.replace(placement, shard_gpus=k, cuda_graph=False, overlap=False)


def load_kwargs(path: Path, placement: Placement) -> dict:
    """``from_pretrained`` placement arguments: one device, or the split's device map."""
    if placement.shard_gpus <= 1:
        return {"device_map": placement.device}
    n = json.loads((Path(path) / "config.json").read_text())["num_hidden_layers"]
    return {"device_map": device_map(n, placement.shard_gpus)}
