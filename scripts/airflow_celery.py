"""The distributed engine on one machine: CeleryExecutor on real servers, all on 127.0.0.1.

    python scripts/airflow_celery.py up  [--dags DIR]                    # start, wait for Ctrl-C, stop
    python scripts/airflow_celery.py run [--dags DIR] --dag ID [--conf JSON] [--timeout S]
                                                                         # start, trigger, wait, stop

Starts Redis (broker), PostgreSQL 15 (metadata DB and Celery result backend
``db+postgresql://``), SeaweedFS (S3 store, keys enforced; bucket ``quantpipe-artifacts``,
Airflow connection ``quantpipe_s3``), then ``airflow db migrate`` and the api-server,
scheduler, dag-processor, triggerer, and one ``airflow celery worker --queues Q`` per queue
(default, gpu-a100, gpu-h100, serving), each with ``WORKER_QUEUE_TAG=Q``. Workers and the
scheduler/triggerer run with ``--skip-serve-logs`` (Airflow's log server binds every
interface); every component shares one local log folder, which the api-server reads.
Everything is stopped by PID at the end. Install the servers first with
``scripts/setup_test_services.sh``.

Importable: ``celery_stack(workdir, dags_folder)`` is a context manager (development; the tests run
the engine in containers: tests/infra/test_compose_stack.py).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from scripts.airflow_rest import AirflowRest  # noqa: E402
from tests.infra.servers import (  # noqa: E402
    HOST,
    ServiceError,
    free_port,
    log_tail,
    postgres_server,
    redis_server,
    seaweedfs_server,
    short_tmpdir,
    venv_bin,
)

QUEUES = ("default", "gpu-a100", "gpu-h100", "serving")
CONN_ID = "quantpipe_s3"
BUCKET = "quantpipe-artifacts"
USERS = {"admin": ("admin", "admin"), "viewer": ("viewer", "viewer")}  # name -> (role, password)


@dataclass(kw_only=True)
class CeleryStack(AirflowRest):
    home: Path
    log_folder: Path
    env: dict = field(repr=False)
    procs: dict = field(default_factory=dict, repr=False)  # name -> Popen
    timings: dict = field(default_factory=dict)
    redis: object = None
    postgres: object = None
    s3: object = None

    def diagnostics(self) -> str:
        return f"; dag-processor log:\n{log_tail(self.home / 'dag-processor.log')}"

    def check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise ServiceError(f"{name} exited with code {p.returncode}; log "
                                   f"{self.home / (name + '.log')}:\n{log_tail(self.home / (name + '.log'))}")


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _airflow_env(home: Path, dags_folder: Path, port: int, redis, pg, s3) -> dict:
    home.mkdir(parents=True, exist_ok=True)
    pw_file = home / "passwords.json"
    pw_file.write_text(json.dumps({u: pw for u, (_, pw) in USERS.items()}))
    pw_file.chmod(0o600)
    from cryptography.fernet import Fernet

    base = f"http://{HOST}:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CORE__PARALLELISM": "8",
        "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base}/execution/",
        "AIRFLOW__API__BASE_URL": base,
        "AIRFLOW__API__HOST": HOST,
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(48),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:{r}" for u, (r, _) in USERS.items()),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(pw_file),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": pg.url(),
        "AIRFLOW__CELERY__BROKER_URL": redis.url(0),
        "AIRFLOW__CELERY__RESULT_BACKEND": pg.celery_result_backend,
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
        "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER": "1",
        "AIRFLOW__OPERATORS__DEFAULT_QUEUE": "default",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        "AIRFLOW__SCHEDULER__DAG_DIR_LIST_INTERVAL": "5",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
        "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "300",
        f"AIRFLOW_CONN_{CONN_ID.upper()}": s3.airflow_conn_json(),
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    })
    env.setdefault("QUANTPIPE_ARTIFACT_ROOT", str(REPO / ".artifacts"))
    env.setdefault("QUANTPIPE_CACHE", str(REPO / ".cache"))
    return env


def _components(port: int, queues: tuple[str, ...]) -> dict[str, tuple[list[str], dict]]:
    comps: dict[str, tuple[list[str], dict]] = {
        "api-server": (["api-server", "-H", HOST, "-p", str(port)], {}),
        "scheduler": (["scheduler", "--skip-serve-logs"], {}),
        "dag-processor": (["dag-processor"], {}),
        "triggerer": (["triggerer", "--skip-serve-logs"], {}),
    }
    for q in queues:
        comps[f"worker-{q}"] = (["celery", "worker", "--queues", q, "--skip-serve-logs", "--concurrency", "1",
                                 "--celery-hostname", f"{q}@%h", "--without-mingle", "--without-gossip"],
                                {"WORKER_QUEUE_TAG": q})
    return comps


def _health(stack: CeleryStack) -> bool:
    status, body = stack.http("GET", "/api/v2/monitor/health", token=False)
    if status != 200 or not isinstance(body, dict):
        return False
    return all((body.get(c) or {}).get("status") == "healthy"
               for c in ("metadatabase", "scheduler", "triggerer", "dag_processor"))


def _worker_ready(stack: CeleryStack, q: str) -> bool:
    text = (stack.home / f"worker-{q}.log").read_text(errors="replace")
    return f"{q}@" in text and " ready." in text


@contextmanager
def celery_stack(workdir: Path | None = None, dags_folder: Path = REPO / "dags",
                 queues: tuple[str, ...] = QUEUES, startup_timeout: float = 240,
                 keep_workdir: bool = False) -> Iterator[CeleryStack]:
    """Start everything, yield a ``CeleryStack`` once every component is healthy, stop by PID.

    Without ``workdir`` a temporary one is used and removed afterwards unless ``keep_workdir``.
    """
    remove_after = workdir is None and not keep_workdir
    workdir = Path(workdir).resolve() if workdir else short_tmpdir("qp-engine-")
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o755)
    airflow = venv_bin("airflow")
    t0 = time.monotonic()
    with ExitStack() as es:
        if remove_after:  # runs last: after every process has stopped
            es.callback(shutil.rmtree, workdir, True)
        redis = es.enter_context(redis_server(workdir / "redis"))
        pg = es.enter_context(postgres_server(workdir / "pg"))
        s3 = es.enter_context(seaweedfs_server(workdir / "s3", bucket=BUCKET))
        t_servers = time.monotonic() - t0
        port = free_port()
        home = workdir / "airflow"
        env = _airflow_env(home, Path(dags_folder).resolve(), port, redis, pg, s3)
        stack = CeleryStack(base_url=f"http://{HOST}:{port}", passwords={u: pw for u, (_, pw) in USERS.items()}, home=home, log_folder=home / "logs", env=env,
                            redis=redis, postgres=pg, s3=s3)
        r = subprocess.run([airflow, "db", "migrate"], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise ServiceError(f"airflow db migrate failed ({r.returncode}):\n{r.stderr[-3000:]}")
        t_migrate = time.monotonic() - t0 - t_servers

        def stop_all() -> None:
            """SIGTERM every component's process group at once, wait, SIGKILL stragglers."""
            t = time.monotonic()
            procs = list(stack.procs.values())
            for p in procs:
                _killpg(p.pid, signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=max(0.1, t + 30 - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            for p in procs:  # children (task runners, gunicorn workers) left in a group
                _killpg(p.pid, signal.SIGKILL)
                if p.poll() is None:
                    p.wait(timeout=5)
            stack.timings["stop_s"] = round(time.monotonic() - t, 1)
            print(f"airflow components stopped in {stack.timings['stop_s']} s", flush=True)
        es.callback(stop_all)
        for name, (args, extra) in _components(port, queues).items():
            log = open(home / f"{name}.log", "ab")
            stack.procs[name] = subprocess.Popen([airflow, *args], env={**env, **extra}, stdout=log,
                                                 stderr=subprocess.STDOUT, start_new_session=True, cwd=home)
        deadline = time.monotonic() + startup_timeout
        pending = {"api+components", *queues}
        while pending and time.monotonic() < deadline:
            stack.check_alive()
            for q in list(pending):
                try:
                    ok = _health(stack) if q == "api+components" else _worker_ready(stack, q)
                except (OSError, ServiceError):
                    ok = False
                if ok:
                    pending.discard(q)
            time.sleep(0.5)
        if pending:
            raise ServiceError(f"not ready within {startup_timeout:.0f} s: {sorted(pending)}; logs in {home}")
        stack.timings = {"servers_s": round(t_servers, 1), "db_migrate_s": round(t_migrate, 1),
                         "components_s": round(time.monotonic() - t0 - t_servers - t_migrate, 1),
                         "total_s": round(time.monotonic() - t0, 1)}
        print(f"celery stack up in {stack.timings['total_s']} s "
              f"(Redis+PostgreSQL+SeaweedFS {stack.timings['servers_s']} s, db migrate "
              f"{stack.timings['db_migrate_s']} s, Airflow components + {len(queues)} workers "
              f"{stack.timings['components_s']} s); api {stack.base_url}", flush=True)
        yield stack


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cmd", choices=["up", "run"])
    ap.add_argument("--dags", type=Path, default=REPO / "dags")
    ap.add_argument("--dag", default="llm_quantization")
    ap.add_argument("--conf", default="{}")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--workdir", type=Path, default=None, help="kept afterwards (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary workdir (logs, data)")
    a = ap.parse_args()
    with celery_stack(a.workdir, a.dags, keep_workdir=a.keep) as stack:
        print(f"UI/API: {stack.base_url} (admin/admin); S3 endpoint {stack.s3.endpoint}, bucket {BUCKET}, "
              f"Airflow connection {CONN_ID}; logs under {stack.home}")
        if a.cmd == "up":
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            try:
                while not stop.wait(2):
                    stack.check_alive()
            except KeyboardInterrupt:
                pass
            return
        run_id = stack.trigger(a.dag, json.loads(a.conf))
        print(f"triggered {a.dag} run {run_id}", flush=True)
        run = stack.wait_run(a.dag, run_id, a.timeout)
        for ti in stack.task_instances(a.dag, run_id):
            print(f"  {ti['task_id']:24s} {str(ti['state']):10s} queue={ti.get('queue')} host={ti.get('hostname')}")
        print(f"run {run_id}: {run['state']}")
        if run["state"] != "success":
            raise SystemExit(1)


if __name__ == "__main__":
    main()
