"""Where sound and broken models fall on every gate check: the data behind the default limits.

Runs the product's own stages on the real small model (this machine's CPU unless a GPU
is visible): the baseline once, then sound quantizations (llm-compressor) and planted
faults (``tests/e2e/plants.py``), each validated exactly as the DAG validates. Prints,
per check, each candidate's estimate, interval and verdict, and writes the JSON.

    .venv/bin/python bench/gate_distributions.py --sound fp8 w8a8 gptq_w4a16 --plants all
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SOUND = {
    "fp8": {"method": "fp8", "bits": 8},
    "w8a8": {"method": "w8a8", "bits": 8, "calibration_samples": 16, "max_seq_length": 128},
    "gptq_w4a16": {"method": "gptq", "bits": 4, "group_size": 32, "calibration_samples": 32, "max_seq_length": 256},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sound", nargs="*", default=list(SOUND))
    ap.add_argument("--plants", nargs="*", default=["all"])
    ap.add_argument("--store", default=None, help="artifact root (default: a fresh temporary folder)")
    ap.add_argument("--conf", default="{}", help="extra DAG params as JSON (evaluation settings)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "gate-distributions.json"))
    a = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("QUANTPIPE_ARTIFACT_ROOT", a.store or tempfile.mkdtemp(prefix="gate-dist-"))
    os.environ.setdefault("QUANTPIPE_CACHE", str(REPO / ".cache"))
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[k] = "1"
    from quantpipe import pipeline
    from quantpipe.store import Store
    from quantpipe.assets.model import builtin_checkpoint
    from tests.e2e import plants

    # every candidate measured in full (fail_fast off): the figures, not only the verdict
    conf = {"run_name": "dist", "sensitivity_layers": 0, "remediation": False, "deploy": False, "fail_fast": False,
            **json.loads(a.conf)}
    settings = pipeline.validate_params({**conf, "method": "fp8", "bits": 8}, store=Store.local())
    t0 = time.perf_counter()
    prep = pipeline.prep_checkpoint(settings, store=Store.local())
    print(f"baseline: {time.perf_counter() - t0:.1f} s (reused: {prep['baseline_reused']})", flush=True)
    model_dir = builtin_checkpoint("smollm2-135m-instruct", Path(os.environ["QUANTPIPE_CACHE"]))
    names = list(plants.ALL) if a.plants == ["all"] else a.plants
    results: dict[str, dict] = {}
    for name in a.sound:
        s = pipeline.validate_params({**conf, **SOUND[name]}, store=Store.local())
        t0 = time.perf_counter()
        calib = pipeline.build_calibration(s, prep, store=Store.local())
        quant = pipeline.run_quantization(s, prep, calib, store=Store.local())
        res = pipeline.run_validation(s, prep, quant, f"dist-{name}", store=Store.local())
        results[f"sound:{name}"] = _summary(res, time.perf_counter() - t0)
    work = Path(tempfile.mkdtemp(prefix="plants-"))
    atexit.register(shutil.rmtree, work, True)  # the planted checkpoints
    for name in names:
        folder = plants.build(name, model_dir, work / name)
        quant = {"quantized_uri": folder.as_uri(), "method": name, "scheme": "planted", "seconds": 0.0,
                 "size_bytes": (folder / "model.safetensors").stat().st_size}
        t0 = time.perf_counter()
        res = pipeline.run_validation(settings, prep, quant, f"dist-{name}", store=Store.local())
        results[f"plant:{name}"] = _summary(res, time.perf_counter() - t0)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"bench": "gate_distributions", "conf": conf, "results": results}, indent=1))
    _print(results)


def _summary(res: dict, secs: float) -> dict:
    from quantpipe.validation.report import REPORT_JSON  # noqa: F401
    from quantpipe.artifacts import uri_to_path

    rep = json.loads((uri_to_path(res["report_folder_uri"]) / "report.json").read_text())
    print(f"{res['verdict']:13s} failed={res['failed_checks']} inconclusive={res['inconclusive_checks']} "
          f"({secs:.0f} s)", flush=True)
    return {"verdict": res["verdict"], "failed": res["failed_checks"], "inconclusive": res["inconclusive_checks"],
            "seconds": round(secs, 1), "excluded": rep.get("excluded_checks"),
            "checks": {c["name"]: {k: c[k] for k in ("estimate", "low", "high", "limit", "verdict", "n",
                                                     "detectable")} for c in rep["checks"]}}


def _print(results: dict) -> None:
    names = list(next(iter(results.values()))["checks"])
    cols = list(results)
    print("check".ljust(30) + "".join(c.split(":", 1)[1][:14].rjust(15) for c in cols))
    for n in names:
        row = n.ljust(30)
        for c in cols:
            x = results[c]["checks"].get(n)
            if x is None or x["estimate"] is None:
                row += "-".rjust(15)
            else:
                mark = {"PASS": " ", "FAIL": "X", "INCONCLUSIVE": "?"}[x["verdict"]]
                row += f"{x['estimate']:.3f}{mark}".rjust(15)
        print(row)


if __name__ == "__main__":
    main()
