"""Defaults for quantizing on a GPU worker (llm-compressor 0.14.0.1, one CUDA device).

Measured by ``bench/gpu_quantize_bench.py`` on one H100 80GB HBM3 (2026-11-24), a
LlamaForCausalLM with Llama-3-8B layer shapes and random bf16 weights (4 layers),
128 x 2048 calibration tokens, GPTQ W4A16 group 128 (s/layer = oneshot wall time / layers,
model build excluded; peak = torch.cuda.max_memory_allocated):

    llm-compressor defaults, model loaded on the CPU (as run.py does)   8.82 s/layer   3.9 GiB
    model on the GPU + sequential_offload_device="cuda"                 5.04 s/layer  10.2 GiB
      + install_fast_hessian("tf32")                                    2.49 s/layer  10.2 GiB
      + install_fast_hessian("bf16")                   (the default)    2.24 s/layer  10.2 GiB
    model on the CPU, activations on the GPU, fast Hessian (tf32)       2.79 s/layer   7.0 GiB
    batch_size=8 on top of tf32 (no gain, +8 GiB)                       2.45 s/layer  18.6 GiB
    70B shapes (2 layers), model on the CPU, activations on GPU, bf16   9.63 s/layer  20.2 GiB
    70B shapes, defaults                                               26.63 s/layer  15.2 GiB
    AWQ W4A16_ASYM: defaults 17.1 s/layer (50.8 GiB); model+activations on GPU 12.4 (55.0 GiB)

Where the time went: GPTQ accumulates ``H += 2 X X^T`` for every quantized Linear and every
calibration batch as a float32 matmul on the CUDA cores (~160 TFLOP per 8B layer for
128 x 2048 tokens); with the model on the CPU the activations also cross PCIe twice per
layer. The activations are bf16/fp16, so their values are exact in TF32 and products of two
are exact in float32: ``install_fast_hessian`` runs the same product on the tensor cores
with float32 accumulation. The Hessian equals the float32 one up to the order of the
float32 sums (the bench's quality probe, relative error of the final hidden states against
the bf16 model, was 0.67068 with defaults and 0.67065 / 0.67076 with the tf32 / bf16 modes;
round-to-nearest gave 0.68988). The GPTQ solve (Cholesky, block updates), the recipe and the
calibration tokens are untouched. On the small real model (``bench/gpu_small_model_quality.py``,
H200, 2026-11-29; four calibration sets, the validation stage's own measures): the placement
alone gives byte-identical checkpoints; the fast Hessian changes ~60 % of the int4 codes
(GPTQ's column-by-column rounding amplifies last-bit differences in the Hessian) with no loss
of quality: mean KL 0.11723 vs 0.11775, top-1 0.8080 vs 0.8075, perplexity +13.50 % vs +13.36 %
(seed-to-seed spread of one calibration size: 1.7 points).

Not used: ``batch_size > 1`` (no measurable gain; with samples of mixed lengths
llm-compressor's collator truncates or pads them, which changes the Hessian) and
``pipeline="basic"`` (1.85 s/layer, but it calibrates every layer on unquantized inputs:
a different algorithm).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

GIB = 1024 ** 3
# headroom for Hessians (largest: intermediate^2 fp32, 3.3 GB at 70B), the GPTQ solve, CUDA context
RESERVE_BYTES = 8 * GIB


def activation_cache_bytes(sample_lengths: Sequence[int], hidden_size: int, dtype_bytes: int = 2) -> int:
    """Bytes of the sequential pipeline's activation cache: one hidden state per sample,
    held twice while a layer's outputs replace its inputs."""
    return 2 * sum(sample_lengths) * hidden_size * dtype_bytes


def _free_bytes(gpu_free_bytes: int | None) -> int:
    if gpu_free_bytes is not None:
        return gpu_free_bytes
    import torch

    return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0


def model_fits_on_gpu(model_bytes: int, *, sample_lengths: Sequence[int] = (), hidden_size: int = 4096,
                      gpu_free_bytes: int | None = None) -> bool:
    """True when the whole model, the activation cache and the reserve fit in free GPU
    memory: then load the checkpoint with ``device_map="cuda"`` (8B: yes on an 80 GB card;
    70B in bf16: no, keep it on the CPU and let oneshot onload one layer at a time)."""
    need = model_bytes + activation_cache_bytes(sample_lengths, hidden_size) + RESERVE_BYTES
    return _free_bytes(gpu_free_bytes) > need


def gpu_oneshot_kwargs(num_layers: int, *, sample_lengths: Sequence[int] = (), hidden_size: int = 4096,
                       model_bytes: int = 0, gpu_free_bytes: int | None = None) -> dict:
    """Extra ``oneshot`` keyword arguments for a CUDA worker: the sequential pipeline with
    the activation cache on the GPU whenever it fits beside one decoder layer."""
    if num_layers < 1:
        raise ValueError("num_layers must be >= 1")
    layer_bytes = model_bytes // num_layers
    acts = activation_cache_bytes(sample_lengths, hidden_size)
    on_gpu = _free_bytes(gpu_free_bytes) > acts + layer_bytes + RESERVE_BYTES
    return {"pipeline": "sequential", "sequential_offload_device": "cuda" if on_gpu else "cpu"}


def _fast_accumulate_hessian(original, mode, inp, module, hessian, num_samples):
    import torch

    if not (inp.is_cuda and inp.dtype in (torch.bfloat16, torch.float16) and isinstance(module, torch.nn.Linear)
            and hessian.dtype == torch.float32 and inp.device == hessian.device):
        return original(inp, module, hessian, num_samples)
    # same bookkeeping as llmcompressor.modifiers.gptq.helpers.accumulate_hessian
    num_samples += inp.shape[0] if inp.dim() >= 3 else 1
    x = inp.reshape(-1, inp.shape[-1])
    if mode == "bf16" and x.dtype == torch.bfloat16:
        try:  # bf16 x bf16 products are exact in fp32; cuBLAS accumulates in fp32
            hessian.add_(torch.mm(x.t(), x, out_dtype=torch.float32), alpha=2.0)
            return hessian, num_samples
        except (RuntimeError, TypeError, NotImplementedError):
            pass  # torch without mm(out_dtype=...): the tf32 path below
    xf = x.float()  # bf16/fp16 values are exact in TF32; products exact in fp32; fp32 sums
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        hessian.addmm_(xf.t(), xf, alpha=2.0)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return hessian, num_samples


def install_fast_hessian(mode: str = "bf16") -> None:
    """Route GPTQ's Hessian accumulation through the tensor cores (see the module
    docstring). ``mode``: "bf16" (bf16 GEMM with a float32 result, fastest) or "tf32".
    Inputs that are not bf16/fp16 CUDA tensors of a plain Linear take llm-compressor's own
    path. Safe to call again (re-installs over the original)."""
    if mode not in ("tf32", "bf16"):
        raise ValueError(f"unknown mode {mode!r}")
    from llmcompressor.modifiers.gptq import base

    original = getattr(base.accumulate_hessian, "_quantpipe_original", base.accumulate_hessian)
    fast = functools.partial(_fast_accumulate_hessian, original, mode)
    fast._quantpipe_original = original  # type: ignore[attr-defined]
    base.accumulate_hessian = fast
