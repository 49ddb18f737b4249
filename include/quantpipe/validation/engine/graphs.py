"""One greedy decode step captured as a CUDA graph, to be replayed without Python or launch
cost per step."""

from __future__ import annotations

import logging
import threading

from .streams import dedicated_stream

log = logging.getLogger(__name__)
_capture_lock = threading.Lock()


def capture_step(step, cache, width: int):
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
