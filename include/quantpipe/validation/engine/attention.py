"""How the engine's forwards attend: grouped-query attention without copying keys and values,
and the SDPA kernels used on CUDA."""

from __future__ import annotations

from contextlib import contextmanager

from .placement import Placement


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
