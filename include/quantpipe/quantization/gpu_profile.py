"""Defaults for quantizing on a GPU worker (llm-compressor 0.14, one CUDA device).

Measured by ``bench/gpu_quantize_bench.py`` on one H100 80GB (2026-11-24), Llama-3-8B
layer shapes, random bf16 weights, 128 x 2048 calibration tokens, GPTQ W4A16 group 128;
the figures are in ``bench/README.md``. What the measurements said:

* llm-compressor's defaults keep the model on the CPU (``run.py`` loads it there) and
  onload one decoder layer at a time; intermediate activations go back to the CPU after
  every layer (``sequential_offload_device="cpu"``). When the whole model and the
  activation cache fit on the GPU, load the model onto the GPU and keep activations there.
* GPTQ's Hessian accumulation (``H += 2 X X^T``) runs as a float32 matmul on the CUDA
  cores. The activations are bf16/fp16, so their values are exact in TF32 and the
  products are exact in float32: ``install_fast_hessian()`` runs the same product on the
  tensor cores with float32 accumulation. The Hessian equals the float32 one up to the
  order of summation; the GPTQ solve itself (Cholesky, block updates) is untouched.
* ``batch_size > 1`` only when every calibration sample has the same length: with mixed
  lengths llm-compressor's collator truncates or pads, which changes the Hessian.

Everything here changes scheduling, placement or the order of float32 sums, never the
algorithm, the recipe or the calibration tokens, so the quantized model's quality is
unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

GIB = 1024 ** 3
# headroom for Hessians (largest: intermediate^2 fp32), the GPTQ solve and CUDA context
_RESERVE_BYTES = 8 * GIB


def activation_cache_bytes(sample_lengths: Sequence[int], hidden_size: int, dtype_bytes: int = 2) -> int:
    """Bytes of the sequential pipeline's activation cache (one hidden state per sample,
    held twice while a layer's outputs replace its inputs)."""
    return 2 * sum(sample_lengths) * hidden_size * dtype_bytes


def gpu_oneshot_kwargs(num_layers: int, *, sample_lengths: Sequence[int] | None = None,
                       hidden_size: int = 4096, model_bytes: int | None = None,
                       gpu_free_bytes: int | None = None, max_batch_size: int = 8) -> dict:
    """Extra ``oneshot`` keyword arguments for a CUDA worker.

    ``model_bytes``: the checkpoint's size in memory (bf16 params x 2); ``gpu_free_bytes``:
    free memory on the device (``torch.cuda.mem_get_info()[0]``), read from the device when
    None. Returns ``{"model_on_gpu": bool, **oneshot_kwargs}``: pop ``model_on_gpu`` and,
    if true, load the model with ``device_map="cuda"``.
    """
    if num_layers < 1:
        raise ValueError("num_layers must be >= 1")
    lengths = list(sample_lengths or [])
    if gpu_free_bytes is None:
        import torch

        gpu_free_bytes = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0
    acts = activation_cache_bytes(lengths, hidden_size) if lengths else 0
    per_layer = (model_bytes or 0) / num_layers
    kw: dict = {"pipeline": "sequential"}
    # activations: on the GPU whenever the cache plus one layer fits
    acts_on_gpu = gpu_free_bytes > acts + per_layer + _RESERVE_BYTES
    kw["sequential_offload_device"] = "cuda" if acts_on_gpu else "cpu"
    # whole model on the GPU when it fits beside the activations
    kw["model_on_gpu"] = bool(model_bytes) and acts_on_gpu and \
        gpu_free_bytes > (model_bytes or 0) + acts + _RESERVE_BYTES
    if lengths and len(set(lengths)) == 1:
        bs = max_batch_size
        while len(lengths) % bs:
            bs //= 2
        if bs > 1:
            kw["batch_size"] = bs
    return kw


def _fast_accumulate_hessian(original, mode, inp, module, hessian, num_samples):
    import torch

    if not (inp.is_cuda and inp.dtype in (torch.bfloat16, torch.float16)
            and isinstance(module, torch.nn.Linear) and hessian.dtype == torch.float32
            and inp.device == hessian.device):
        return original(inp, module, hessian, num_samples)
    x = inp.reshape(-1, inp.shape[-1]) if inp.dim() != 2 else inp
    num_samples += inp.shape[0] if inp.dim() >= 3 else 1
    if mode == "bf16" and x.dtype == torch.bfloat16:
        # bf16 x bf16 products are exact in fp32; cuBLAS accumulates in fp32
        hessian.add_(torch.mm(x.t(), x, out_dtype=torch.float32), alpha=2.0)
        return hessian, num_samples
    # bf16/fp16 values are exact in TF32; products of two are exact in fp32; sums in fp32
    xf = x.float()
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        hessian.addmm_(xf.t(), xf, alpha=2.0)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return hessian, num_samples


def install_fast_hessian(mode: str = "tf32") -> bool:
    """Route GPTQ's Hessian accumulation through the tensor cores (see module docstring).
    ``mode``: "tf32" (float32 inputs on TF32 tensor cores) or "bf16" (bf16 GEMM with a
    float32 result). Idempotent; returns True once installed."""
    from llmcompressor.modifiers.gptq import base

    if mode not in ("tf32", "bf16"):
        raise ValueError(f"unknown mode {mode!r}")
    original = getattr(base.accumulate_hessian, "_quantpipe_original", base.accumulate_hessian)
    fast = functools.partial(_fast_accumulate_hessian, original, mode)
    fast._quantpipe_original = original  # type: ignore[attr-defined]
    fast._quantpipe_fast = True  # type: ignore[attr-defined]
    base.accumulate_hessian = fast
    return True
