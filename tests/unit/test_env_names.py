"""Every QUANTPIPE_* variable that docker-compose.yaml and docker/* set is one the code reads.

A name the code does not read is silently ignored (compose once set QUANTPIPE_STORE_URI and
QUANTPIPE_STORE_CONN_ID while the DAGs read QUANTPIPE_REMOTE_ROOT / QUANTPIPE_REMOTE_CONN, so
the distributed engine quietly used a local store). What the code reads, from the source of
include/, dags/ and plugins/ (AST, not docstrings or messages):

- a string constant that is exactly a variable name (``os.environ.get("QUANTPIPE_CACHE")``,
  ``CONFIG_ENV = "QUANTPIPE_REQUANTIZE_CONFIG"``, ``api_key_env = "QUANTPIPE_VLLM_API_KEY"``);
- a prefix constant (ending in ``_``) read field by field by a settings model:
  ``QUANTPIPE_DEPLOY_<FIELD>`` (DeploySettings.load), ``QUANTPIPE_MONITOR_<FIELD>``
  (MonitorSettings.load), ``QUANTPIPE_EVAL_<FIELD>`` (EvalEngine.from_env reads every
  ``QUANTPIPE_EVAL_*`` and refuses unknown fields), ``QUANTPIPE_QUANT_<FIELD>`` (QuantEngine),
  so only ``prefix + FIELD`` names count.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yaml"
DOCKER = REPO / "docker"
CODE_DIRS = ("include", "dags", "plugins")
NAME = re.compile(r"QUANTPIPE_[A-Z0-9_]*[A-Z0-9]")
PREFIX = re.compile(r"QUANTPIPE_[A-Z0-9_]*_")


def prefix_models() -> dict:
    """prefix -> the settings model whose fields it is read with."""
    from quantpipe.deployment.settings import ENV_PREFIX as DEPLOY, DeploySettings
    from quantpipe.monitoring.settings import ENV_PREFIX as MONITOR, MonitorSettings
    from quantpipe.settings import EvalEngine, QuantEngine

    return {DEPLOY: DeploySettings, MONITOR: MonitorSettings, "QUANTPIPE_EVAL_": EvalEngine,
            "QUANTPIPE_QUANT_": QuantEngine}


# ------------------------------------------------------------------ what the code reads
def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def code_constants() -> tuple[set[str], set[str]]:
    """(exact variable names, prefixes) among the string constants of the code."""
    names, prefixes = set(), set()
    for d in CODE_DIRS:
        for path in sorted((REPO / d).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            skip = _docstrings(tree)
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
                    if NAME.fullmatch(node.value):
                        names.add(node.value)
                    elif PREFIX.fullmatch(node.value):
                        prefixes.add(node.value)
    return names, prefixes


def names_the_code_reads() -> set[str]:
    names, prefixes = code_constants()
    models = prefix_models()
    unknown = prefixes - set(models)
    assert not unknown, (f"the code reads variables by the prefixes {sorted(unknown)}: add each to "
                         "prefix_models() in this test with the model whose fields it reads")
    for prefix, model in models.items():
        assert prefix in prefixes, f"{prefix} is no longer a prefix in the code: update prefix_models()"
        names |= {prefix + field.upper() for field in model.model_fields}
    return names


# ------------------------------------------------------------------ what compose and images set
def compose_sets(text: str) -> dict[str, set[str]]:
    """QUANTPIPE_* name -> services of the compose file that set it (anchors and merges resolved)."""
    out: dict[str, set[str]] = {}
    for service, spec in (yaml.safe_load(text).get("services") or {}).items():
        env = spec.get("environment") or {}
        keys = env.keys() if isinstance(env, dict) else [e.split("=", 1)[0] for e in env]
        for k in keys:
            if k.startswith("QUANTPIPE_"):
                out.setdefault(k, set()).add(service)
    return out


def dockerfile_sets(text: str) -> set[str]:
    """QUANTPIPE_* names an ENV instruction sets (``ENV A=1 B=2`` and ``ENV A 1``)."""
    out = set()
    text = re.sub(r"\\\n", " ", text)
    for line in text.splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) == 2 and parts[0].upper() == "ENV":
            body = parts[1]
            if "=" in body.split(None, 1)[0]:
                out |= set(re.findall(r"(?:^|\s)(QUANTPIPE_[A-Z0-9_]+)=", body))
            elif body.startswith("QUANTPIPE_"):
                out.add(body.split(None, 1)[0])
    return out


def docker_dir_sets() -> dict[str, set[str]]:
    """name -> files under docker/ that set it (Dockerfile ENV; ``NAME=`` assignments elsewhere)."""
    out: dict[str, set[str]] = {}
    # the text files only: docker/wheelhouse holds ~1 GB of wheels that set nothing
    for path in sorted(p for p in DOCKER.rglob("*") if p.is_file() and "wheelhouse" not in p.parts
                       and p.suffix not in (".whl", ".gz", ".zip", ".tar")):
        text = path.read_text(errors="replace")
        found = dockerfile_sets(text) if path.name == "Dockerfile" else \
            set(re.findall(r"(?:^|\s)(?:export\s+)?(QUANTPIPE_[A-Z0-9_]+)=", text, re.M))
        for n in found:
            out.setdefault(n, set()).add(path.relative_to(REPO).as_posix())
    return out


def unread(set_by: dict[str, set[str]], read: set[str]) -> dict[str, list[str]]:
    return {n: sorted(where) for n, where in sorted(set_by.items()) if n not in read}


# ------------------------------------------------------------------ tests
def test_the_reader_finds_the_names_the_code_is_known_to_read():
    read = names_the_code_reads()
    assert {"QUANTPIPE_REMOTE_ROOT", "QUANTPIPE_REMOTE_CONN", "QUANTPIPE_CACHE", "QUANTPIPE_ARTIFACT_ROOT",
            "QUANTPIPE_VLLM_CMD", "QUANTPIPE_VLLM_API_KEY", "QUANTPIPE_REQUANTIZE_CONFIG",
            "QUANTPIPE_DEPLOY_STATE_DIR", "QUANTPIPE_DEPLOY_ENDPOINT_PORT", "QUANTPIPE_EVAL_DEVICE",
            "QUANTPIPE_MONITOR_PUSHGATEWAY_URL"} <= read
    # the names compose once used, which nothing reads, must not count as read
    assert not {"QUANTPIPE_STORE_URI", "QUANTPIPE_STORE_CONN_ID", "QUANTPIPE_DEPLOY_NO_SUCH_FIELD"} & read
    # and the old compose file is caught
    old = "services:\n  w:\n    environment:\n      QUANTPIPE_STORE_URI: s3://b\n      QUANTPIPE_CACHE: /c\n"
    assert unread(compose_sets(old), read) == {"QUANTPIPE_STORE_URI": ["w"]}


def test_every_name_compose_sets_is_read_by_the_code():
    sets = compose_sets(COMPOSE.read_text())
    assert sets, "docker-compose.yaml sets no QUANTPIPE_* variable (parsing broke?)"
    bad = unread(sets, names_the_code_reads())
    assert not bad, f"docker-compose.yaml sets QUANTPIPE_* variables the code never reads (name: services): {bad}"


def test_every_name_the_images_set_is_read_by_the_code():
    sets = docker_dir_sets()
    assert "QUANTPIPE_VLLM_CMD" in sets, "docker/serving/Dockerfile's ENV was not parsed"
    bad = unread(sets, names_the_code_reads())
    assert not bad, f"docker/ sets QUANTPIPE_* variables the code never reads (name: files): {bad}"


def test_dockerfile_env_parser():
    text = 'FROM x\nENV A=1 \\\n    QUANTPIPE_X=1 \\\n    QUANTPIPE_Y="a b"\nENV QUANTPIPE_Z 1\nRUN QUANTPIPE_W=1 true\n'
    assert dockerfile_sets(text) == {"QUANTPIPE_X", "QUANTPIPE_Y", "QUANTPIPE_Z"}


def test_compose_uses_no_minio_image():
    """MinIO no longer publishes community images; the S3 store is SeaweedFS (docker/seaweedfs)."""
    text = COMPOSE.read_text()
    assert "minio/minio" not in text and "minio/mc" not in text
    services = yaml.safe_load(text)["services"]
    assert not [n for n, s in services.items() if str(s.get("image", "")).startswith("minio/")]
    assert services["seaweedfs"]["build"]["dockerfile"] == "docker/seaweedfs/Dockerfile"
    assert (REPO / "docker" / "seaweedfs" / "Dockerfile").is_file()
