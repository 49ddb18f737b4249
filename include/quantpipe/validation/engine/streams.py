"""CUDA streams kept per role, and running work in side threads on them beside other work."""

from __future__ import annotations

import threading
from typing import Sequence

_streams: dict[tuple[str, int], object] = {}
_streams_lock = threading.Lock()


def dedicated_stream(role: str, priority: int = 0, new=None):
    """The CUDA stream kept for ``role`` for the life of the process, its CUDA handle used
    by no other role. ``torch.cuda.Stream()`` hands out a round-robin pool (32 streams per
    priority), so streams made per call come to share handles: after enough evaluations
    lm-eval's side stream was the very stream a decode step was being captured on, and its
    host-to-device copies failed the capture ("Cannot copy between CPU and CUDA tensors
    during CUDA graph capture", seen on an H200), or would have been recorded into the graph.
    ``new(priority)`` makes a stream (tests pass a fake)."""
    if new is None:
        import torch

        def new(p):
            return torch.cuda.Stream(priority=p)

    with _streams_lock:
        key = (role, priority)
        if key not in _streams:
            taken = {s.cuda_stream for s in _streams.values()}
            for _ in range(1024):
                s = new(priority)
                if s.cuda_stream not in taken:
                    break
            else:
                raise RuntimeError(f"no CUDA stream of priority {priority} left that no other role uses")
            _streams[key] = s
        return _streams[key]


def overlapped(main, *sides, priorities: Sequence[int] = ()):
    """Run each of ``sides`` in its own thread on its own CUDA stream while ``main`` runs
    here: decode steps and lm-eval's Python work (building, tokenizing and scoring requests)
    fill the gaps of the perplexity pass's large GEMMs. ``priorities``: CUDA stream priority
    per side (-1: its kernels go first whenever SMs free up, for small latency-bound decode
    steps beside large GEMMs; 0: normal). Returns (main(), *sides())."""
    import torch

    boxes: list[dict] = [{} for _ in sides]
    prio = list(priorities) + [0] * (len(sides) - len(priorities))
    streams = [dedicated_stream(f"side-{i}", p) for i, p in enumerate(prio)]

    def worker(fn, box, stream):
        try:
            stream.wait_stream(torch.cuda.current_stream())
            with torch.inference_mode(), torch.cuda.stream(stream):
                box["out"] = fn()
                stream.synchronize()
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    threads = [threading.Thread(target=worker, args=(fn, box, st), name=f"quantpipe-eval-side-{i}")
               for i, (fn, box, st) in enumerate(zip(sides, boxes, streams))]
    for th in threads:
        th.start()
    try:
        first = main()
    finally:
        for th in threads:
            th.join()
    torch.cuda.synchronize()
    for box in boxes:
        if "error" in box:
            raise box["error"]
    return (first, *(box["out"] for box in boxes))
