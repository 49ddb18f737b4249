"""Fault: the worker's task process is killed (SIGKILL) while the quantize task saves its artifact.

On the shared live Airflow instance (LocalExecutor, real scheduler): trigger a run, wait until
the quantize task's scratch folder appears under ``quantized/`` (the save is in progress), kill
the process that owns it (its PID is in the scratch folder's name), and assert that
- no partial artifact is ever visible at the final path while the process is dead,
- Airflow marks the try failed and retries it (the DAG's retries), and the retry succeeds,
- exactly one complete artifact exists at the end, its manifest verifies, and the dead
  writer's scratch folder is gone.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from quantpipe.artifacts import MANIFEST, verify_folder

from ..live_airflow import wait_for_dag

DAG = "llm_quantization"
# FP8 takes no calibration, so its artifact key depends on the checkpoint and settings only: an
# FP8 run earlier in the session has stored the same key, and the task would reuse it without
# saving. The test parks the stored FP8 artifacts outside the store for its run (and puts them back).
CONF = {"method": "fp8", "bits": 8, "run_name": "worker-kill", "seed": 4242, "calibration_samples": 16,
        "max_seq_length": 128, "ppl_max_tokens": 1024, "num_prompts": 2, "max_new_tokens": 8, "task_limit": 0,
        "sensitivity_layers": 0, "remediation": False, "deploy": False}
TASK = "quantize_fp8"

pytestmark = pytest.mark.slow


def _ti(af, token, run_id) -> dict:
    status, body = af._http("GET", f"/api/v2/dags/{DAG}/dagRuns/{quote(run_id, safe='')}/taskInstances/{TASK}",
                            token=token)
    return body if status == 200 else {}


def _scratch(root: Path) -> list[Path]:
    return sorted(root.glob(".*.tmp-*")) if root.is_dir() else []


def _park(quantized: Path, parking: Path) -> list[Path]:
    """Move the stored FP8 artifacts out of the store so this run has to quantize and save."""
    parking.mkdir(parents=True, exist_ok=True)
    moved = []
    for p in sorted(quantized.glob("fp8-*")) if quantized.is_dir() else []:
        shutil.move(str(p), str(parking / p.name))
        moved.append(parking / p.name)
    return moved


def _unpark(quantized: Path, moved: list[Path]) -> None:
    for p in moved:
        if not (quantized / p.name).exists():
            shutil.move(str(p), str(quantized / p.name))


def test_killed_quantize_task_is_retried_and_leaves_one_complete_artifact(airflow_instance, admin_token, tmp_path):
    af, token = airflow_instance, admin_token
    quantized = Path(af.artifact_root) / "quantized"
    parked = _park(quantized, tmp_path / "parked")
    try:
        _kill_and_retry(af, token, quantized)
    finally:
        _unpark(quantized, parked)


def _kill_and_retry(af, token, quantized: Path) -> None:
    wait_for_dag(af, DAG, token)
    status, body = af._http("PATCH", f"/api/v2/dags/{DAG}", {"is_paused": False}, token)
    assert status == 200 and not body["is_paused"], body
    status, run = af._http("POST", f"/api/v2/dags/{DAG}/dagRuns", {"logical_date": None, "conf": CONF}, token)
    assert status in (200, 201), run
    run_id = run["dag_run_id"]
    before = {p.name for p in quantized.iterdir()} if quantized.is_dir() else set()
    try:
        # 1. wait for the save to start, then kill the process that writes. The save of a
        #    small model lasts about a second, shorter than one REST call on a loaded machine:
        #    a thread watches the folder alone and kills at once; the task state is read beside it.
        seen: list[Path] = []
        stop = threading.Event()

        def watch():
            while not stop.is_set() and not seen:
                found = _scratch(quantized)
                if found:  # kill at once, from here
                    os.kill(int(found[0].name.rsplit(".tmp-", 1)[1].split("-")[0]), signal.SIGKILL)
                    seen.append(found[0])
                    return
                time.sleep(0.005)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        deadline = time.time() + 900
        try:
            while not seen and time.time() < deadline:
                ti = _ti(af, token, run_id)
                watcher.join(0.5)
                assert seen or ti.get("state") not in ("success", "failed", "upstream_failed"), \
                    f"{TASK} ended ({ti.get('state')}) before its save was seen; nothing was killed"
        finally:
            stop.set()
        assert seen, "the quantize task never started saving"
        victim = seen[0]
        final = quantized / victim.name[1:].rsplit(".tmp-", 1)[0]
        t_kill = time.time()

        # 2. the try fails; the final path never shows a partial artifact meanwhile
        while True:
            ti = _ti(af, token, run_id)
            assert not final.exists() or (final / MANIFEST).is_file(), f"partial artifact visible at {final}"
            if ti.get("try_number", 1) >= 2 or ti.get("state") in ("up_for_retry", "success", "failed"):
                break
            assert time.time() - t_kill < 300, f"Airflow did not notice the killed task: {ti}"
            time.sleep(1)
        assert not final.exists(), "the killed try published an artifact"

        # 3. the retry runs and succeeds
        while True:
            ti = _ti(af, token, run_id)
            assert not final.exists() or (final / MANIFEST).is_file(), f"partial artifact visible at {final}"
            if ti.get("state") in ("success", "failed", "upstream_failed"):
                break
            assert time.time() - t_kill < 900, f"the retry did not finish: {ti}"
            time.sleep(2)
        assert ti["state"] == "success" and ti["try_number"] == 2, ti

        # 4. one complete, verified artifact; the dead writer's scratch is gone
        new = sorted({p.name for p in quantized.iterdir()} - before)
        assert new == [final.name], new
        verify_folder(final, deep=True)
        assert _scratch(quantized) == [], _scratch(quantized)
        assert not any(p.name.startswith(f".{final.name}.stale-") for p in quantized.iterdir())
    finally:
        # the rest of the run (validation) is not this test's subject: stop it
        af._http("PATCH", f"/api/v2/dags/{DAG}/dagRuns/{quote(run_id, safe='')}", {"state": "failed"}, token)
