"""Serve each checkpoint on vLLM's CPU build in turn and print one JSON line of figures.

    .venv/bin/python bench/serving_bench.py --model bf16=.cache/models/smollm2-135m-instruct \
        --model fp8=/path/to/fp8-checkpoint [--repeats 3] [--gen-tokens 64]

Servers run one at a time (never two heavy processes at once) and are stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", required=True, help="LABEL=PATH, repeatable")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--port", type=int, default=8190)
    a = ap.parse_args()
    from quantpipe.deployment.bench import measure
    from quantpipe.deployment.preflight import detect_scheme
    from quantpipe.deployment.settings import DeploySettings

    s = DeploySettings.load()
    results = []
    for spec in a.model:
        label, _, path = spec.partition("=")
        p = Path(path)
        if not label or not (p / "config.json").is_file():
            sys.exit(f"--model {spec!r}: expected LABEL=PATH to a checkpoint folder with config.json")
        r = measure(s, p, label, repeats=a.repeats, gen_tokens=a.gen_tokens, port=a.port)
        r["scheme"] = detect_scheme(json.loads((p / "config.json").read_text()))
        r["weights_mb"] = round(sum(f.stat().st_size for f in p.glob("*.safetensors")) / 1e6, 1)
        results.append(r)
        print(f"# {label}: {r}", file=sys.stderr, flush=True)
    print(json.dumps({"bench": "serving", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "host": {"cpus": os.cpu_count(), "machine": platform.machine(),
                               "load_avg_1m": round(os.getloadavg()[0], 2)},
                      "target": s.serving_target().as_dict(),
                      "vllm_cmd": s.vllm_cmd, "enforce_eager": s.resolved(s.serving_target().name).enforce_eager,
                      "kvcache_gib": s.cpu_kvcache_space_gib, "results": results}))


if __name__ == "__main__":
    main()
