"""Run the embedded default: Airflow components on LocalExecutor + SQLite, bound to 127.0.0.1.

    python scripts/airflow_local.py start      # migrate the DB, start components in the background
    python scripts/airflow_local.py trigger    # trigger llm_quantization through the REST API, wait, print
    python scripts/airflow_local.py stop       # stop what start started (by PID)

State lives in .airflow/ (gitignored). ``start`` is idempotent: running components are kept.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from quantpipe.procs import pid_alive

REPO = Path(__file__).resolve().parents[1]
HOME = Path(os.environ.get("QUANTPIPE_AIRFLOW_HOME", REPO / ".airflow"))
HOST, PORT = "127.0.0.1", int(os.environ.get("QUANTPIPE_AIRFLOW_PORT", "8080"))
BASE = f"http://{HOST}:{PORT}"
DAG_ID = "llm_quantization"
USERS = {"admin": ("admin", "admin"), "viewer": ("viewer", "viewer")}  # name -> (role, password)
COMPONENTS = {
    "api-server": ["api-server", "-H", HOST, "-p", str(PORT)],
    "scheduler": ["scheduler", "--skip-serve-logs"],
    "dag-processor": ["dag-processor"],
    "triggerer": ["triggerer", "--skip-serve-logs"],
}


def airflow_env() -> dict:
    HOME.mkdir(parents=True, exist_ok=True)
    secret_file = HOME / "jwt_secret"
    if not secret_file.exists():
        secret_file.write_text(secrets.token_hex(48))
    pw_file = HOME / "passwords.json"
    pw_file.write_text(json.dumps({u: pw for u, (_, pw) in USERS.items()}))
    env = dict(os.environ)
    env.update({
        "AIRFLOW_HOME": str(HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{HOME / 'airflow.db'}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{BASE}/execution/",
        "AIRFLOW__API__BASE_URL": BASE,
        "AIRFLOW__API_AUTH__JWT_SECRET": secret_file.read_text(),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:{r}" for u, (r, _) in USERS.items()),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(pw_file),
        "AIRFLOW__SCHEDULER__DAG_DIR_LIST_INTERVAL": "10",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    })
    env.setdefault("QUANTPIPE_ARTIFACT_ROOT", str(REPO / ".artifacts"))
    env.setdefault("QUANTPIPE_CACHE", str(REPO / ".cache"))
    key_file = HOME / "vllm_api_key"
    if not key_file.exists():
        key_file.write_text(secrets.token_urlsafe(24))
        key_file.chmod(0o600)
    env.setdefault("QUANTPIPE_VLLM_API_KEY", key_file.read_text())  # vLLM requires it; never printed
    env.setdefault("QUANTPIPE_MONITOR_PUSHGATEWAY_URL", "http://127.0.0.1:9091")
    env.setdefault("QUANTPIPE_MONITOR_PROMETHEUS_URL", "http://127.0.0.1:9090")
    env.setdefault("QUANTPIPE_MONITOR_ENDPOINT_URL", "http://127.0.0.1:8000/v1")
    return env


def _airflow_bin() -> str:
    return str(Path(sys.executable).with_name("airflow"))


def _http(method: str, path: str, body: dict | None = None, token: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(BASE + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else {}
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except json.JSONDecodeError:
            return e.code, {"detail": raw.decode(errors="replace")}


def token(user: str = "admin") -> str:
    status, body = _http("POST", "/auth/token", {"username": user, "password": USERS[user][1]})
    if status not in (200, 201):
        raise SystemExit(f"login as {user} failed: {status} {body}")
    return body["access_token"]


def start() -> None:
    env = airflow_env()
    (HOME / "logs").mkdir(exist_ok=True)
    subprocess.run([_airflow_bin(), "db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
    for name, args in COMPONENTS.items():
        pidfile = HOME / f"{name}.pid"
        if pidfile.exists() and pid_alive(int(pidfile.read_text())):
            print(f"{name} already running (pid {pidfile.read_text()})")
            continue
        log = open(HOME / "logs" / f"{name}.log", "ab")
        p = subprocess.Popen([_airflow_bin(), *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        pidfile.write_text(str(p.pid))
        print(f"started {name} (pid {p.pid}, log {HOME / 'logs' / (name + '.log')})")
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if _http("GET", "/api/v2/monitor/health")[0] == 200:
                break
        except OSError:
            pass
        time.sleep(2)
    else:
        raise SystemExit(f"api-server did not answer on {BASE} within 180 s; see {HOME / 'logs'}")
    print(f"Airflow UI: {BASE}  (login admin / admin; viewer / viewer is read-only)")


def stop_deployments() -> None:
    """Stop the vLLM servers and the stable endpoint the demo's deploy task left running."""
    os.environ.update({k: v for k, v in airflow_env().items() if k.startswith("QUANTPIPE_")})
    from quantpipe.artifacts import ArtifactStore
    from quantpipe.deployment.settings import DeploySettings
    from quantpipe.deployment.switchover import teardown
    from quantpipe.settings import Environment

    store = ArtifactStore(Environment.from_env().artifact_root)
    root = store.path("deployments")
    if not root.is_dir():
        return
    for name in sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        pids = teardown(store, DeploySettings.load(), name)
        if pids:
            print(f"stopped deployment {name} (pids {pids})")


def stop() -> None:
    stop_deployments()
    for name in reversed(list(COMPONENTS)):
        pidfile = HOME / f"{name}.pid"
        if not pidfile.exists():
            continue
        pid = int(pidfile.read_text())
        if pid_alive(pid):
            os.killpg(pid, signal.SIGTERM)
            for _ in range(30):
                if not pid_alive(pid):
                    break
                time.sleep(0.5)
            try:  # whatever of its process group outlived it (or it, after 15 s)
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            print(f"stopped {name} (pid {pid})")
        pidfile.unlink()


def trigger(conf: dict, timeout_s: int = 3600) -> dict:
    tok = token()
    deadline = time.time() + 120
    while True:  # the dag-processor needs a moment to parse the DAG on a fresh DB
        status, body = _http("PATCH", f"/api/v2/dags/{DAG_ID}", {"is_paused": False}, tok)
        if status == 200:
            break
        if time.time() > deadline:
            raise SystemExit(f"DAG {DAG_ID} not available: {status} {body}")
        time.sleep(3)
    status, run = _http("POST", f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": conf}, tok)
    if status not in (200, 201):
        raise SystemExit(f"trigger refused ({status}): {run.get('detail', run)}")
    run_id = run["dag_run_id"]
    print(f"triggered {DAG_ID} run {run_id}")
    deadline = time.time() + timeout_s
    last = None
    while time.time() < deadline:
        _, run = _http("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}", token=tok)
        if run.get("state") != last:
            print(f"  run state: {run.get('state')}")
            last = run.get("state")
        if run.get("state") in ("success", "failed"):
            break
        time.sleep(5)
        if time.time() % 600 < 5:
            tok = token()
    _, tis = _http("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances", token=tok)
    states = {t["task_id"]: t["state"] for t in tis.get("task_instances", [])}
    status, x = _http("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/validate/xcomEntries/"
                             "return_value", token=tok)
    validation = x.get("value") if status == 200 else None
    if isinstance(validation, str):
        validation = json.loads(validation)
    deployed = None
    if states.get("deploy") == "success":
        status, x = _http("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/deploy/xcomEntries/"
                                 "return_value", token=tok)
        deployed = x.get("value") if status == 200 else None
        if isinstance(deployed, str):
            deployed = json.loads(deployed)
    deploy_error = _deploy_error(run_id, tok) if states.get("deploy") == "failed" else None
    return {"run_id": run_id, "state": run.get("state"), "tasks": states, "validation": validation,
            "deployed": deployed, "deploy_error": deploy_error}


def _deploy_error(run_id: str, tok: str) -> str | None:
    """What the failed deploy task said went wrong and what to try ('deploy failed: ...' or
    'deploy refused by pre-flight: ...' in its log)."""
    import re

    base = f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/deploy"
    try:
        _, ti = _http("GET", base, token=tok)
        for try_number in range(int(ti.get("try_number") or 1), 0, -1):
            status, body = _http("GET", f"{base}/logs/{try_number}?full_content=true", token=tok)
            if status != 200:
                continue
            text = json.dumps(body.get("content", body))
            found = re.findall(r'(deploy (?:failed|refused by pre-flight): (?:[^"\\]|\\.)*?)(?: Details:|")', text)
            if found:
                return json.loads(f'"{found[-1]}"')
    except (OSError, ValueError):
        pass
    return None


def ask_endpoint(deployed: dict, prompt: str = "The capital of France is") -> str:
    key = airflow_env()["QUANTPIPE_VLLM_API_KEY"]
    body = {"model": deployed["model"], "prompt": prompt, "max_tokens": 8, "temperature": 0}
    req = urllib.request.Request(deployed["endpoint_url"].rstrip("/") + "/completions", method="POST",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())["choices"][0]["text"]


def prometheus_metric(expr: str, wait_s: float = 60) -> list:
    import urllib.parse

    url = "http://127.0.0.1:9090/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    deadline = time.time() + wait_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                result = json.loads(r.read())["data"]["result"]
        except OSError:
            result = []
        if result or time.time() > deadline:
            return result
        time.sleep(3)


def main() -> None:
    cmd = sys.argv[1] if len(sys.argv) > 1 else "help"
    if cmd == "start":
        start()
    elif cmd == "stop":
        stop()
    elif cmd == "trigger":
        conf = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
        res = trigger(conf)
        print(f"run {res['run_id']}: {res['state']}")
        for t, s in res["tasks"].items():
            print(f"  {t:20s} {s}")
        v = res["validation"]
        if v:
            print(f"gate: {'PASSED' if v['passed'] else 'FAILED ' + ', '.join(v['failed_checks'])}"
                  f" (perplexity {v['perplexity_baseline']:.3f} -> {v['perplexity_quantized']:.3f},"
                  f" top-1 agreement {v['top1_agreement']:.3f}, greedy token agreement {v['token_agreement']:.3f})")
            print(f"report: {v['report_html_uri']}")
        d = res.get("deployed")
        if d:
            print(f"endpoint: {d['endpoint_url']} (model {d['model']!r}, {d['scheme']}, vLLM pid {d['pid']}, "
                  f"loaded in {d['load_seconds']:.0f} s; API key in .airflow/vllm_api_key)")
            print(f"completion: 'The capital of France is' ->{ask_endpoint(d)!r}")
            series = prometheus_metric('vllm:generation_tokens_total')
            print("prometheus: " + (", ".join(f"{r['metric'].get('__name__')}{{model_name={r['metric'].get('model_name')!r}}}"
                                              f"={r['value'][1]}" for r in series)
                                    if series else "no vLLM series scraped yet (is scripts/monitoring_local.py "
                                                   "running?)") + "  (http://127.0.0.1:9090)")
        if res.get("deploy_error"):
            print(res["deploy_error"])
        print(f"Airflow UI: {BASE}/dags/{DAG_ID}/runs/{res['run_id']}  (login admin / admin)")
        if res["state"] != "success":
            raise SystemExit(1)
    else:
        print(__doc__)


if __name__ == "__main__":
    main()
