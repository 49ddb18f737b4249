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

Modules, one concern each:

* ``placement``: ``Placement``, ``resolve_placement`` (device, dtype, batch sizes on this
  worker), ``parts`` and ``device_of`` (decoder body, output head, input device of a model);
  splitting layers over GPUs is ``validation.sharding``.
* ``streams``: ``dedicated_stream`` (one CUDA stream per role) and ``overlapped`` (work in
  side threads on their own streams beside the main work).
* ``attention``: ``grouped_query_sdpa`` and ``attention_kernels`` (how the forwards attend).
* ``packing``: ``window_batches``, ``pack_rows`` and ``loglikelihoods`` (requests packed
  into few large forwards).
* ``decoding``: ``common_prefix`` and ``greedy`` (batched greedy decoding, its prefills).
* ``graphs``: ``capture_step`` (a decode step captured as a CUDA graph).

The names below are re-exported; code that patches one for a test patches it in the module
that looks it up (e.g. ``engine.packing.parts``), not here.
"""

from .attention import attention_kernels, grouped_query_sdpa
from .decoding import common_prefix, greedy
from .graphs import capture_step
from .packing import loglikelihoods, pack_rows, window_batches
from .placement import Placement, device_of, parts, resolve_placement
from .streams import dedicated_stream, overlapped

__all__ = [
    "Placement", "attention_kernels", "capture_step", "common_prefix", "dedicated_stream", "device_of", "greedy",
    "grouped_query_sdpa", "loglikelihoods", "overlapped", "pack_rows", "parts", "resolve_placement",
    "window_batches",
]
