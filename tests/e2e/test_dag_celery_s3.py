"""The real quantization DAG on the distributed engine: CeleryExecutor with one worker per
queue (Redis broker, PostgreSQL metadata DB) and every artifact in S3 (SeaweedFS), all on
127.0.0.1 and stopped by PID."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

from quantpipe.objectstore import verify_remote

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
CONF = {"method": "fp8", "bits": 8, "run_name": "celery-s3", "ppl_max_tokens": 1024, "num_prompts": 2,
        "max_new_tokens": 8, "task_limit": 0, "sensitivity_layers": 1, "remediation": False, "deploy": False}
EXPECTED_QUEUE = {"validate_params": "default", "prep_checkpoint": "gpu-a100", "build_calibration": "default",
                  "route": "default", "quantize_fp8": "gpu-h100", "validate": "gpu-a100",
                  "publish_approved": "serving"}


def _launcher():
    spec = importlib.util.spec_from_file_location("airflow_celery", REPO / "scripts" / "airflow_celery.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, mod)  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture()
def isolated_cache(tmp_path, cache_dir, model_dir, corpus_dir, monkeypatch):
    """A fresh worker cache that shares only the offline inputs (model, corpus, task sets)."""
    from quantpipe.assets.tasks import builtin_tasks

    builtin_tasks(cache_dir)
    cache = tmp_path / "cache"
    cache.mkdir()
    for sub in ("models", "corpus", "tasks", "downloads"):
        (cache / sub).symlink_to(cache_dir / sub)
    monkeypatch.setenv("QUANTPIPE_CACHE", str(cache))
    monkeypatch.setenv("QUANTPIPE_ARTIFACT_ROOT", str(tmp_path / "local-artifacts-unused"))
    return cache


def test_quantization_dag_on_celery_workers_with_artifacts_in_s3(isolated_cache, monkeypatch):
    launcher = _launcher()
    monkeypatch.setenv("QUANTPIPE_REMOTE_ROOT", f"s3://{launcher.BUCKET}/quantpipe")
    monkeypatch.setenv("QUANTPIPE_REMOTE_CONN", launcher.CONN_ID)
    t0 = time.monotonic()
    with launcher.celery_stack(dags_folder=REPO / "dags") as stack:
        print(f"\nSTACK STARTUP: {stack.timings} ({time.monotonic() - t0:.1f} s)")
        run_id = stack.trigger("llm_quantization", CONF)
        run = stack.wait_run("llm_quantization", run_id, timeout=1500)
        tis = {ti["task_id"]: ti for ti in stack.task_instances("llm_quantization", run_id)}
        assert run["state"] == "success", {t: ti["state"] for t, ti in tis.items()}
        print(f"RUN: {time.monotonic() - t0:.1f} s since start")

        for task_id, queue in EXPECTED_QUEUE.items():
            ti = tis[task_id]
            assert ti["state"] == "success" and ti["queue"] == queue, (task_id, ti["state"], ti["queue"])
            wlog = (stack.home / f"worker-{queue}.log").read_text(errors="replace")
            assert task_id in wlog, f"{task_id} not received by the {queue} worker"
            for other in launcher.QUEUES:
                if other != queue:
                    other_log = (stack.home / f"worker-{other}.log").read_text(errors="replace")
                    assert not re.search(rf"\b{task_id}\b", other_log), f"{task_id} also ran on {other}"
        assert tis["quantize"]["state"] == "skipped"

        fs = stack.s3.fs()
        prep = stack.xcom("llm_quantization", run_id, "prep_checkpoint")
        quant = stack.xcom("llm_quantization", run_id, "quantize_fp8")
        val = stack.xcom("llm_quantization", run_id, "validate")
        pub = stack.xcom("llm_quantization", run_id, "publish_approved")
        uris = [prep["checkpoint_uri"], prep["baseline_uri"], quant["quantized_uri"], val["report_folder_uri"],
                pub["record_uri"]]
        for uri in uris:
            assert uri.startswith(f"s3://{launcher.BUCKET}/quantpipe/") and "@" not in uri, uri
            manifest = verify_remote(fs, uri, deep=True)
            assert manifest["files"], uri
        report = json.loads(fs.cat_file(val["report_uri"]))
        assert report["passed"] and report["quantization"]["scheme"] == "FP8_DYNAMIC"
        pointer = json.loads(fs.cat_file(pub["pointer_uri"]))
        assert pointer["model_uri"] == quant["quantized_uri"]
        # the validate worker staged its inputs from S3 into its cache, verified by manifest
        assert any((isolated_cache / "staged").iterdir())

        secrets_ = [stack.s3.secret_key, stack.postgres.password]
        for path in stack.home.rglob("*.log"):
            text = path.read_text(errors="replace")
            assert not any(s in text for s in secrets_), f"a secret appears in {path}"
        for t in EXPECTED_QUEUE:
            if t == "route":  # a branch's choice is not pushed as XCom
                continue
            x = json.dumps(stack.xcom("llm_quantization", run_id, t))
            assert not any(s in x for s in secrets_)
    print(f"TOTAL: {time.monotonic() - t0:.1f} s")
    assert os.environ["QUANTPIPE_REMOTE_ROOT"].startswith("s3://")
