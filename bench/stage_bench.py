"""CPU benchmark: seconds per stage on the small model, and the Airflow overhead.

    python bench/stage_bench.py [--methods fp8,gptq] [--samples 16] [--seq 128] [--no-airflow]

For each method it runs the stages directly in one process (fresh artifact root, so
nothing is reused but the baseline of the first method), then the same params
through ``dag.test()`` (fresh artifact root again) and reports the DAG wall time
minus the direct wall time as Airflow's overhead. Prints one JSON line per method.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def direct(conf: dict) -> dict:
    from quantpipe import pipeline as p
    from quantpipe.store import Store

    t = {}
    t0 = time.perf_counter()
    s = p.validate_params(conf, store=Store.local())
    t["validate_params"] = time.perf_counter() - t0
    for name, fn in (("prep_checkpoint", lambda: p.prep_checkpoint(s, store=Store.local())),):
        t1 = time.perf_counter()
        prep = fn()
        t[name] = time.perf_counter() - t1
    t1 = time.perf_counter()
    calib = p.build_calibration(s, prep, store=Store.local())
    t["build_calibration"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    quant = p.run_quantization(s, prep, calib, store=Store.local())
    t["quantize"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    val = p.run_validation(s, prep, quant, "bench", store=Store.local())
    t["validate"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    if p.gate(val):
        p.publish_approved(s, val, "bench", store=Store.local())
    t["gate_publish"] = time.perf_counter() - t1
    t["total"] = time.perf_counter() - t0
    return {"seconds": {k: round(v, 2) for k, v in t.items()}, "validation": val}


def via_dag(conf: dict, home: Path) -> float:
    """DAG wall time through dag.test() in a subprocess with its own Airflow home."""
    env = dict(os.environ, AIRFLOW_HOME=str(home), AIRFLOW__CORE__LOAD_EXAMPLES="False",
               AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
               AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home / 'airflow.db'}")
    airflow = str(Path(sys.executable).with_name("airflow"))
    subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True)
    code = ("import json,sys,time\nfrom airflow.dag_processing.dagbag import DagBag\n"
            f"d=DagBag(dag_folder={str(REPO / 'dags')!r}).dags['llm_quantization']\n"
            "t=time.perf_counter(); dr=d.test(run_conf=json.loads(sys.argv[1])); "
            "print('WALL', time.perf_counter()-t, dr.state)")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(conf)], env=env, capture_output=True, text=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("WALL")]
    if not line:
        raise RuntimeError(out.stderr[-2000:])
    _, wall, state = line[-1].split()
    if "success" not in state:
        raise RuntimeError(f"DAG run ended {state}")
    return float(wall)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="fp8,gptq")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--no-airflow", action="store_true")
    a = ap.parse_args()
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[k] = "1"
    base = Path(tempfile.mkdtemp(prefix="quantpipe-bench-"))
    atexit.register(shutil.rmtree, base, True)  # its checkpoints and Airflow homes
    for method in a.methods.split(","):
        bits = 8 if method in ("fp8", "w8a8") else 4
        conf = {"method": method, "bits": bits, "calibration_samples": a.samples, "max_seq_length": a.seq,
                "run_name": f"bench-{method}", "ppl_increase_pct": 1000, "accuracy_drop_pct": 100,
                "min_top1_agreement": 0, "max_mean_kl": 100, "remediation": False,
                "deploy": False}
        os.environ["QUANTPIPE_ARTIFACT_ROOT"] = str(base / f"direct-{method}")
        res = direct(conf)
        out = {"method": method, "stage_seconds": res["seconds"],
               "perplexity": [round(res["validation"]["perplexity_baseline"], 3),
                              round(res["validation"]["perplexity_quantized"], 3)],
               "top1_agreement": round(res["validation"]["top1_agreement"], 4),
               "calibration": f"{a.samples}x{a.seq}", "cpu_count": os.cpu_count()}
        if not a.no_airflow:
            # same work, fresh store: only the baseline is recomputed in both, so totals compare
            os.environ["QUANTPIPE_ARTIFACT_ROOT"] = str(base / f"dag-{method}")
            wall = via_dag(conf, base / f"airflow-{method}")
            out["dag_wall_s"] = round(wall, 2)
            out["airflow_overhead_s"] = round(wall - res["seconds"]["total"], 2)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
