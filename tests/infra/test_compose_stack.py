"""The production form, for real: ``docker-compose.yaml`` (with ``docker-compose.cpu.yaml``: the GPU
queues' workers on the CPU) built and run in containers on this machine, driven only through its
published ports: the Airflow REST API, the S3 store and the model endpoint.

One run of the real DAG (W8A8, task checks and deploy on). While it quantizes, the gpu-a100 worker
container is killed (SIGKILL) and started again. The test asserts that:

- the scheduler notices the dead task (heartbeat timeout), the retry completes on the restarted
  worker, and the run succeeds through gate, publish and deploy;
- each task ran in the container of its queue's worker;
- every object in the bucket belongs to an artifact whose manifest verifies (sha256 of every file)
  and lists exactly the files there: nothing partial is visible;
- no two containers share a filesystem: Airflow containers mount nothing from the host but the
  passwords secret, and each worker has its own cache volume (S3 is the only hand-off);
- the endpoint answers a completion through the stack's published port;
- ``docker compose down -v`` leaves no container, volume or network of the project.

Images are built by ``docker/build_images.sh`` (layers reused between runs); the Docker daemon is
started when it is not running (``scripts/ensure_docker.sh``). Timings are printed.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from quantpipe.objectstore import MANIFEST, verify_remote

from .servers import free_ports

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
DAG = "llm_quantization"
BUCKET = "quantpipe-artifacts"
USER_TASKS = REPO / "tests" / "data" / "user_tasks"  # lm-eval YAML + data: 120 capital-city questions
# task checks on: the user's own task folder, read from S3 like the users of the stack keep it
# (the built-in sets sit near chance on the small model and would be excluded with their reason)
# Generation kept short (the planted suite's settings): the stack's two CPUs are shared by a dozen
# containers. This is the suite's sound-W8A8 gate test: the default gate, task checks on, must pass it.
CONF = {"method": "w8a8", "bits": 8, "run_name": "compose-stack", "tasks": ["capitals"],
        "user_tasks_uri": f"s3://{BUCKET}/user-tasks/", "category_drop_pct": {"capitals": 15},
        "num_prompts": 4, "max_new_tokens": 12, "sensitivity_layers": 0,
        "calibration_samples": 16, "max_seq_length": 128}
# task -> the compose service whose worker must run it
TASK_SERVICE = {"validate_params": "worker-default", "prep_checkpoint": "worker-gpu-a100",
                "build_calibration": "worker-default", "quantize": "worker-gpu-a100",
                "validate": "worker-gpu-a100", "publish_approved": "worker-serving",
                "deploy": "worker-serving"}
AIRFLOW_SERVICES = ("airflow-init", "api-server", "scheduler", "dag-processor", "triggerer",
                    "worker-default", "worker-gpu-a100", "worker-gpu-h100", "worker-serving")


def _run(cmd: list[str], timeout: float = 1800, env: dict | None = None, check: bool = True) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                       env={**os.environ, **(env or {})})
    if check and r.returncode != 0:
        pytest.fail(f"{' '.join(cmd[:6])} ... failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def _airflow_rest():
    sys.path.insert(0, str(REPO))
    from scripts.airflow_rest import AirflowRest

    return AirflowRest


class Compose:
    def __init__(self, project: str, env_file: Path):
        self.project = project
        self.base = ["docker", "compose", "-p", project, "--env-file", str(env_file),
                     "-f", "docker-compose.yaml", "-f", "docker-compose.cpu.yaml"]

    def __call__(self, *args: str, timeout: float = 900, check: bool = True) -> str:
        return _run([*self.base, *args], timeout=timeout, check=check)

    def container(self, service: str) -> str:
        cid = self("ps", "-aq", service).strip()
        assert cid, f"no container for {service}"
        return cid

    def inspect(self, service: str) -> dict:
        return json.loads(_run(["docker", "inspect", self.container(service)]))[0]

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={self.project}"
        return {kind: _run(["docker", *cmd, "--filter", label]).split()
                for kind, cmd in (("containers", ["ps", "-aq"]), ("volumes", ["volume", "ls", "-q"]),
                                  ("networks", ["network", "ls", "-q"]))}


def _write_env(workdir: Path) -> tuple[Path, dict]:
    from cryptography.fernet import Fernet

    passwords = {"admin": "admin-" + secrets.token_hex(8), "viewer": "viewer-" + secrets.token_hex(8)}
    pw_file = workdir / "passwords.json"
    pw_file.write_text(json.dumps(passwords))
    pw_file.chmod(0o644)  # read inside the api-server container by its own user
    ports = dict(zip(("AIRFLOW_API_PORT", "S3_PORT", "ENDPOINT_PORT", "PROMETHEUS_PORT", "PUSHGATEWAY_PORT",
                      "ALERTMANAGER_PORT"), map(str, free_ports(6))))
    env = {"POSTGRES_PASSWORD": secrets.token_hex(16), "REDIS_PASSWORD": secrets.token_hex(16),
           "S3_ACCESS_KEY": "qp" + secrets.token_hex(8), "S3_SECRET_KEY": secrets.token_hex(20), "S3_BUCKET": BUCKET,
           "AIRFLOW_FERNET_KEY": Fernet.generate_key().decode(), "AIRFLOW_JWT_SECRET": secrets.token_hex(48),
           "AIRFLOW_PASSWORDS_FILE": str(pw_file), "GRAFANA_ADMIN_PASSWORD": secrets.token_hex(8),
           "VLLM_API_KEY": secrets.token_hex(16), "AIRFLOW_TASK_HEARTBEAT_TIMEOUT": "60", **ports}
    path = workdir / "stack.env"
    path.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    return path, {**env, "passwords": passwords}


def _wait_http(url: str, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                if r.status == 200:
                    return
        except OSError as e:
            last = e
        time.sleep(2)
    pytest.fail(f"{what} did not answer at {url} within {timeout:.0f} s ({last})")


def _s3(env: dict):
    import s3fs

    return s3fs.S3FileSystem(key=env["S3_ACCESS_KEY"], secret=env["S3_SECRET_KEY"],
                             client_kwargs={"endpoint_url": f"http://127.0.0.1:{env['S3_PORT']}",
                                            "region_name": "us-east-1"})


def _assert_every_object_in_a_verified_artifact(fs, root: str) -> int:
    """Every object under ``root`` lies in a folder whose manifest verifies and lists exactly what
    is there, or is a pointer (``approved/<name>.json``: one object, written in one PUT) to such an
    artifact. Returns the number of artifacts."""
    files = sorted(fs.find(root))
    assert files, f"nothing under s3://{root}"
    pointers = [f for f in files if f.startswith(f"{root}/approved/") and f.endswith(".json")
                and "/" not in f[len(f"{root}/approved/"):]]
    for f in pointers:
        target = json.loads(fs.cat_file(f))["model_uri"]
        assert verify_remote(fs, target, deep=False)["files"], f"{f} points to {target}, which does not verify"
    files = [f for f in files if f not in pointers]
    folders = sorted({f.rsplit("/", 1)[0] for f in files if f.endswith("/" + MANIFEST)}, key=len, reverse=True)
    covered: dict[str, list[str]] = {d: [] for d in folders}
    orphans = []
    for f in files:
        owner = next((d for d in folders if f.startswith(d + "/")), None)
        if owner is None:
            orphans.append(f)
        elif not f.endswith("/" + MANIFEST) or f.rsplit("/", 1)[0] != owner:
            covered[owner].append(f[len(owner) + 1:])
    assert not orphans, f"objects outside any complete artifact (partial uploads?): {orphans[:10]}"
    for d in folders:
        manifest = verify_remote(fs, f"s3://{d}", deep=True)
        # each object is owned by its deepest artifact folder, so nested artifacts never show up here
        extra = set(covered[d]) - {e["path"] for e in manifest["files"]}
        assert not extra, f"s3://{d}: objects its manifest does not list: {sorted(extra)[:10]}"
    return len(folders)


@pytest.fixture()
def stack(tmp_path):
    timings = {}
    t = time.monotonic()
    out = _run([str(REPO / "scripts" / "ensure_docker.sh"), sys.executable], timeout=900)
    print(f"\n{out.strip()}")
    t_build = time.monotonic()
    out = _run([str(REPO / "docker" / "build_images.sh")], timeout=3600, env={"PYTHON": sys.executable})
    timings["images_s"] = round(time.monotonic() - t_build, 1)
    print(out.strip())
    env_file, env = _write_env(tmp_path)
    compose = Compose(f"qptest{os.getpid()}", env_file)
    try:
        t_up = time.monotonic()
        compose("up", "-d", timeout=900)
        _wait_http(f"http://127.0.0.1:{env['AIRFLOW_API_PORT']}/api/v2/monitor/health", 600, "the api-server")
        timings["stack_start_s"] = round(time.monotonic() - t_up, 1)
        yield compose, env, timings
    finally:
        if sys.exc_info()[0] is not None or os.environ.get("QUANTPIPE_STACK_LOGS"):
            print(compose("logs", "--no-color", "--tail", "40", check=False, timeout=120)[-20000:])
        compose("down", "-v", "--remove-orphans", "--timeout", "30", check=False, timeout=600)
        print(f"STACK: {timings}, total {time.monotonic() - t:.0f} s")


def test_compose_stack_runs_the_dag_in_containers_with_s3_as_the_only_hand_off(stack):
    compose, env, timings = stack
    AirflowRest = _airflow_rest()
    api = AirflowRest(f"http://127.0.0.1:{env['AIRFLOW_API_PORT']}", env["passwords"])

    # --- no shared filesystem: looked at before anything runs
    mounts = {}
    for svc in AIRFLOW_SERVICES:
        info = compose.inspect(svc)
        for m in info["Mounts"]:
            if m["Type"] == "bind":
                assert m["Destination"].startswith("/run/secrets/"), f"{svc} bind-mounts {m['Source']} from the host"
                continue
            mounts.setdefault(m.get("Name") or m["Source"], []).append(svc)
    shared = {name: svcs for name, svcs in mounts.items() if len(svcs) > 1}
    assert not shared, f"volumes shared between containers: {shared}"
    for svc in ("worker-default", "worker-gpu-a100", "worker-gpu-h100", "worker-serving"):
        assert any(svc in svcs for svcs in mounts.values()), f"{svc} has no cache volume of its own"

    # --- the user's evaluation folder, uploaded to the stack's S3 store
    fs = _s3(env)
    fs.put(str(USER_TASKS) + "/", f"{BUCKET}/user-tasks/", recursive=True)
    assert fs.find(f"{BUCKET}/user-tasks"), "the user's task folder did not reach S3"

    # --- the run, with the quantize worker killed mid-task
    t_run = time.monotonic()
    run_id = api.trigger(DAG, CONF, parse_timeout=300)
    deadline = time.monotonic() + 1500
    while True:
        tis = {ti["task_id"]: ti for ti in api.task_instances(DAG, run_id)}
        if tis["quantize"]["state"] == "running":
            break
        assert tis["quantize"]["state"] in (None, "scheduled", "queued"), tis["quantize"]
        assert time.monotonic() < deadline, {t: ti["state"] for t, ti in tis.items()}
        time.sleep(2)
    time.sleep(5)  # into the task
    a100 = compose.container("worker-gpu-a100")
    _run(["docker", "kill", a100])
    killed_at = round(time.monotonic() - t_run, 1)
    time.sleep(3)
    compose("start", "worker-gpu-a100")
    run = api.wait_run(DAG, run_id, timeout=2400)
    timings["run_s"] = round(time.monotonic() - t_run, 1)
    tis = {ti["task_id"]: ti for ti in api.task_instances(DAG, run_id)}
    states = {t: (ti["state"], ti["try_number"]) for t, ti in tis.items()}
    print(f"RUN {run['state']} in {timings['run_s']} s (worker killed at {killed_at} s): {states}")
    print("TASK SECONDS: " + ", ".join(f"{t} {ti['duration']:.0f}" for t, ti in tis.items() if ti.get("duration")))
    if run["state"] != "success":
        failed = [t for t, ti in tis.items() if ti["state"] == "failed"]
        logs = {t: "\n".join(line for line in api.task_log(DAG, run_id, t, tis[t]["try_number"]).splitlines()
                             if '"level": "error"' in line or '"level": "warning"' in line)[-6000:] for t in failed}
        serving = compose("exec", "-T", "worker-serving", "sh", "-c",
                          "for f in $(find /opt/airflow/cache/serving -name '*.log'); do echo == $f; tail -n 40 $f; done",
                          check=False)[-6000:]
        pytest.fail(f"run {run['state']}: {states}\n" + "\n".join(f"--- {t}:\n{log}" for t, log in logs.items())
                    + f"\n--- serving logs:\n{serving}")
    for task in TASK_SERVICE:
        assert tis[task]["state"] == "success", (task, states[task])
    assert tis["quantize"]["try_number"] >= 2, f"quantize was not retried after the kill: {states['quantize']}"

    # --- each task ran in its queue's container (the TI's hostname is the container's)
    hostnames = {svc: compose.inspect(svc)["Config"]["Hostname"] for svc in set(TASK_SERVICE.values())}
    for task, svc in TASK_SERVICE.items():
        assert tis[task]["hostname"].split(".")[0] == hostnames[svc], (task, tis[task]["hostname"], svc)

    # --- S3 holds everything, complete
    prep = api.xcom(DAG, run_id, "prep_checkpoint")
    quant = api.xcom(DAG, run_id, "quantize")
    val = api.xcom(DAG, run_id, "validate")
    pub = api.xcom(DAG, run_id, "publish_approved")
    for uri in (prep["checkpoint_uri"], prep["baseline_uri"], quant["quantized_uri"], val["report_folder_uri"],
                pub["record_uri"]):
        assert uri.startswith(f"s3://{BUCKET}/quantpipe/") and "@" not in uri, uri
        assert verify_remote(fs, uri, deep=True)["files"], uri
    n_artifacts = _assert_every_object_in_a_verified_artifact(fs, f"{BUCKET}/quantpipe")
    report = json.loads(fs.cat_file(val["report_uri"]))
    assert report["passed"], report.get("failed_checks")
    task_checks = {c["name"]: c["verdict"] for c in report["checks"] if c["name"].startswith("task:")}
    assert task_checks.get("task:capitals") == "PASS", (task_checks, report.get("excluded_checks"))
    pointer = json.loads(fs.cat_file(pub["pointer_uri"]))
    assert pointer["model_uri"] == quant["quantized_uri"]
    logs = fs.find(f"{BUCKET}/airflow-logs")
    assert any("task_id=deploy" in k for k in logs), "task logs did not reach the bucket"
    secret_values = [env[k] for k in ("S3_SECRET_KEY", "POSTGRES_PASSWORD", "REDIS_PASSWORD", "VLLM_API_KEY")]
    for task in TASK_SERVICE:
        log = api.task_log(DAG, run_id, task, tis[task]["try_number"])
        assert not [s for s in secret_values if s in log], f"a secret appears in the log of {task}"
        x = json.dumps(api.xcom(DAG, run_id, task))
        assert not [s for s in secret_values if s in x], f"a secret appears in the XCom of {task}"

    # --- the endpoint answers through the stack
    deployed = api.xcom(DAG, run_id, "deploy")
    body = {"model": deployed["model"], "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    req = urllib.request.Request(f"http://127.0.0.1:{env['ENDPOINT_PORT']}/v1/completions", method="POST",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {env['VLLM_API_KEY']}"})
    with urllib.request.urlopen(req, timeout=300) as r:
        text = json.loads(r.read())["choices"][0]["text"]
    print(f"ENDPOINT: {body['prompt']!r} -> {text!r}; {n_artifacts} artifacts verified in S3")
    assert text.strip(), "the endpoint answered with no text"

    # --- down -v leaves nothing
    t_down = time.monotonic()
    compose("down", "-v", "--remove-orphans", "--timeout", "30", timeout=600)
    timings["down_s"] = round(time.monotonic() - t_down, 1)
    left = compose.leftovers()
    assert not any(left.values()), f"left after down -v: {left}"
