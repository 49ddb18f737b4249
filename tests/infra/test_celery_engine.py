"""The distributed engine, for real: CeleryExecutor + Redis + PostgreSQL + SeaweedFS on 127.0.0.1.

A probe DAG (tests/infra/dags/queue_probe.py) has one task per queue. The test triggers it
through the REST API and proves, from the task logs read back through the api-server, that
each task ran on the worker started for its queue (``WORKER_QUEUE_TAG``), and that each
artifact landed in the bucket with a valid manifest. Everything it starts is stopped by PID.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import time
from pathlib import Path

import pytest

from quantpipe.objectstore import verify_remote

from .servers import pid_alive, port_open

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PROBE_DAGS = Path(__file__).resolve().parent / "dags"
DAG_QUEUES = ("default", "gpu-a100", "gpu-h100", "serving")


def _load_launcher():
    spec = importlib.util.spec_from_file_location("airflow_celery", REPO / "scripts" / "airflow_celery.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def test_queue_probe_runs_each_task_on_its_queue_worker_and_lands_artifacts_in_s3():
    launcher = _load_launcher()
    t0 = time.monotonic()
    with launcher.celery_stack(dags_folder=PROBE_DAGS, queues=DAG_QUEUES) as stack:
        print(f"\nSTACK STARTUP: {stack.timings}")
        # only 127.0.0.1: the API answers there; nothing of ours listens on other addresses
        assert stack.base_url.startswith("http://127.0.0.1:")
        pids = {name: p.pid for name, p in stack.procs.items()}
        server_pids = [stack.redis.pid, stack.postgres.pid, stack.s3.pid]
        _assert_loopback_only(set(pids.values()) | set(server_pids))

        store = f"s3://{stack.s3.bucket}/queue-probe"
        t_run = time.monotonic()
        run_id = stack.trigger("queue_probe", {"conn_id": launcher.CONN_ID, "store_uri": store})
        run = stack.wait_run("queue_probe", run_id, timeout=240)
        print(f"RUN: {run['state']} in {time.monotonic() - t_run:.1f} s")
        tis = {ti["task_id"]: ti for ti in stack.task_instances("queue_probe", run_id)}
        assert run["state"] == "success", {t: ti["state"] for t, ti in tis.items()}

        fs = stack.s3.fs()
        for q in DAG_QUEUES:
            task_id = f"probe_{q.replace('-', '_')}"
            ti = tis[task_id]
            assert ti["state"] == "success" and ti["queue"] == q
            log = stack.task_log("queue_probe", run_id, task_id)
            tags = set(re.findall(r"WORKER_QUEUE_TAG=([\w-]+)", log))
            assert tags == {q}, f"{task_id}: worker tags in its log: {tags}\n{log[-2000:]}"
            assert "verified" in log
            # the worker for q received this task, no other worker did
            for other in DAG_QUEUES:
                wlog = (stack.home / f"worker-{other}.log").read_text(errors="replace")
                assert (task_id in wlog) == (other == q), f"{task_id} seen in worker-{other}.log: {task_id in wlog}"

            out = stack.xcom("queue_probe", run_id, task_id)
            assert out["queue"] == q and out["worker_tag"] == q and not out["skipped"]
            uri = out["uri"]
            assert uri == f"{store}/{run_id}/{q}" and "@" not in uri, uri  # plain URI, no conn id
            manifest = verify_remote(fs, uri, deep=True)
            assert {f["path"] for f in manifest["files"]} == {"probe.json", "payload.bin"}
            assert manifest["meta"] == {"queue": q, "run_id": run_id}
            probe = json.loads(fs.cat_file(f"{uri}/probe.json"))
            assert probe["worker_tag"] == q

        # a re-run of a task whose artifact is complete skips the upload and says so
        task_id = "probe_gpu_a100"
        status, body = stack.http("POST", "/api/v2/dags/queue_probe/clearTaskInstances",
                                  {"dry_run": False, "task_ids": [task_id], "dag_run_id": run_id,
                                   "only_failed": False, "reset_dag_runs": True})
        assert status == 200, body
        run = stack.wait_run("queue_probe", run_id, timeout=120, min_try={task_id: 2})
        assert run["state"] == "success"
        log2 = stack.task_log("queue_probe", run_id, task_id, try_number=2)
        assert "already complete; skipping the upload" in log2, log2[-2000:]
        assert set(re.findall(r"WORKER_QUEUE_TAG=([\w-]+)", log2)) == {"gpu-a100"}
        assert stack.xcom("queue_probe", run_id, task_id)["skipped"] is True

        # secrets never reach the logs (task logs, component logs) or XCom
        secrets_ = [stack.s3.secret_key, stack.postgres.password, stack.redis.password]
        for q in DAG_QUEUES:
            xcom = json.dumps(stack.xcom("queue_probe", run_id, f"probe_{q.replace('-', '_')}"))
            assert not any(s in xcom for s in secrets_) and "@" not in xcom
        for path in stack.home.rglob("*.log"):
            text = path.read_text(errors="replace")
            for s in secrets_:
                assert s not in text, f"a secret appears in {path}"
    print(f"TOTAL (start, run, stop): {time.monotonic() - t0:.1f} s")
    for pid in [*pids.values(), *server_pids]:
        assert not pid_alive(pid), f"pid {pid} still running after the stack stopped"
    assert not port_open(int(stack.base_url.rsplit(":", 1)[1]))


def _assert_loopback_only(pids: set[int]) -> None:
    """Every TCP listener owned by our processes (or their children) is on 127.0.0.1."""
    def children(pid):
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return []
    all_pids, todo = set(), list(pids)
    while todo:
        p = todo.pop()
        if p not in all_pids:
            all_pids.add(p)
            todo += children(p)
    inodes = set()
    for p in all_pids:
        try:
            for fd in Path(f"/proc/{p}/fd").iterdir():
                target = str(fd.readlink()) if fd.is_symlink() else ""
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    bad, found = [], []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state == "0A" and inode in inodes:  # LISTEN
                found.append(local)
                addr = local.split(":")[0]
                if addr not in ("0100007F", "00000000000000000000000001000000"):
                    bad.append(local)
    assert not bad, f"listeners off 127.0.0.1: {bad}"
    assert len(found) >= 4, f"found only {found} listeners; the check did not see our servers"
