"""What the GPU benchmarks share: the Llama shapes they time (random weights, no download),
the model config built from a shape, and a device sync for honest timings."""

from __future__ import annotations

SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2),
}


def llama_config(shape: str, layers: int, vocab: int, max_positions: int = 4096):
    """A Llama-3-style config (untied head, rope theta 500k) of ``shape`` with ``layers`` layers."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, num_hidden_layers=layers, max_position_embeddings=max_positions,
                       tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=500000.0, **SHAPES[shape])


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
