"""Serving figures of one checkpoint on the target vLLM build.

- ``load_s``: launch until ``/health`` answers 200 (process start, weights, KV cache).
- ``first_request_s``: the first completion after /health (warm-up inside vLLM).
- ``ttft_s``: median time to the first streamed token of a short prompt.
- ``tokens_per_s``: median generated tokens / request time of a single-stream
  completion of ``gen_tokens`` tokens (``ignore_eos``), decode-dominated.
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.request
from pathlib import Path

from . import server as srv
from .health import request_json
from .settings import DeploySettings

PROMPT = "Once upon a time, in a small village,"


def ttft(base_url: str, model: str, prompt: str = PROMPT, timeout: float = 120) -> float:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0.0,
                       "stream": True}).encode()
    req = urllib.request.Request(f"{base_url}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for line in r:
            line = line.strip()
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0].get("text"):
                    dt = time.perf_counter() - t0
                    for _ in r:  # drain the stream
                        pass
                    return dt
    raise RuntimeError("stream ended without a token")


def throughput(base_url: str, model: str, gen_tokens: int, timeout: float = 300) -> float:
    t0 = time.perf_counter()
    out = request_json(f"{base_url}/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": gen_tokens,
                                                      "temperature": 0.0, "ignore_eos": True}, timeout=timeout)
    return out["usage"]["completion_tokens"] / (time.perf_counter() - t0)


def measure(s: DeploySettings, model_dir: Path, label: str, *, repeats: int = 3, gen_tokens: int = 64,
            port: int | None = None) -> dict:
    from .settings import LIMIT_FIELDS

    s = s.resolved(s.serving_target().name)  # the limits the server runs with (per target when unset)
    h = srv.launch(s, model_dir, label, port=port, tag=f"bench-{label}")
    try:
        load_s = srv.wait_healthy(h, s.startup_timeout_s, poll=0.25)
        t0 = time.perf_counter()
        request_json(f"{h.base_url}/v1/completions", {"model": label, "prompt": PROMPT, "max_tokens": 4,
                                                      "temperature": 0.0}, timeout=s.request_timeout_s)
        first = time.perf_counter() - t0
        ttfts = [ttft(h.base_url, label) for _ in range(repeats)]
        tps = [throughput(h.base_url, label, gen_tokens) for _ in range(repeats)]
        if not srv.is_alive(h):
            raise srv.LaunchError(f"server died during the benchmark:\n{srv.log_tail(h)}")
    finally:
        srv.stop(h, s.stop_timeout_s)
    return {"label": label, "model_dir": str(model_dir), "load_s": round(load_s, 2),
            "first_request_s": round(first, 3), "ttft_s": round(statistics.median(ttfts), 4),
            "ttft_all_s": [round(x, 4) for x in ttfts], "tokens_per_s": round(statistics.median(tps), 2),
            "tokens_per_s_all": [round(x, 2) for x in tps], "gen_tokens": gen_tokens,
            "limits": {f: getattr(s, f) for f in LIMIT_FIELDS}}
