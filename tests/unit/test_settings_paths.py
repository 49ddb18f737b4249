"""Paths come from the environment, never from where the package is installed.

An image installs quantpipe into site-packages, so a default derived from the package's
``__file__`` lands there. Deployment state follows QUANTPIPE_DEPLOY_STATE_DIR, else
``$QUANTPIPE_CACHE/serving``; the re-quantization list follows QUANTPIPE_REQUANTIZE_CONFIG, else
the checkout's include/requantize.yaml (the single-machine default).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import quantpipe
from quantpipe.deployment.settings import DeploySettings, default_state_dir
from quantpipe.scheduling import CONFIG_ENV, DEFAULT_ENTRIES, PlanError, config_path, load_entries

REPO = Path(__file__).resolve().parents[2]
PACKAGE = Path(quantpipe.__file__).resolve().parent
DAG_FILE = REPO / "dags" / "llm_requantize.py"


# ------------------------------------------------------------------ deployment state
def test_state_dir_follows_the_cache_dir_of_the_given_environment(tmp_path):
    s = DeploySettings.load(environ={"QUANTPIPE_CACHE": str(tmp_path / "cache")})
    assert s.state_dir == tmp_path / "cache" / "serving"


def test_state_dir_default_is_read_when_settings_are_made_not_at_import(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTPIPE_CACHE", str(tmp_path / "c1"))
    assert DeploySettings().state_dir == tmp_path / "c1" / "serving"
    assert DeploySettings.load().state_dir == tmp_path / "c1" / "serving"
    monkeypatch.setenv("QUANTPIPE_CACHE", str(tmp_path / "c2"))
    assert DeploySettings().state_dir == tmp_path / "c2" / "serving"


def test_state_dir_env_and_override_win(tmp_path):
    env = {"QUANTPIPE_CACHE": str(tmp_path / "cache"), "QUANTPIPE_DEPLOY_STATE_DIR": str(tmp_path / "state")}
    assert DeploySettings.load(environ=env).state_dir == tmp_path / "state"
    assert DeploySettings.load({"state_dir": tmp_path / "o"}, environ=env).state_dir == tmp_path / "o"


def test_state_dir_survives_resolving_limits_for_a_target(tmp_path):
    s = DeploySettings.load(environ={"QUANTPIPE_CACHE": str(tmp_path)})
    assert s.resolved("cpu-avx2").state_dir == tmp_path / "serving"


def test_single_machine_default_is_the_checkouts_cache(monkeypatch):
    """What tests, `make demo` and scripts/airflow_local.py get: they set QUANTPIPE_CACHE to
    <repo>/.cache, and without it the fallback is the same folder Environment.from_env uses."""
    from quantpipe.settings import Environment

    monkeypatch.delenv("QUANTPIPE_CACHE", raising=False)
    assert default_state_dir() == Environment.from_env().cache_dir / "serving" == REPO / ".cache" / "serving"
    assert default_state_dir({"QUANTPIPE_CACHE": str(REPO / ".cache")}) == REPO / ".cache" / "serving"


def test_state_dir_is_not_inside_the_package_when_the_cache_is_configured(tmp_path):
    s = DeploySettings.load(environ={"QUANTPIPE_CACHE": str(tmp_path)})
    assert PACKAGE not in s.state_dir.resolve().parents


# ------------------------------------------------------------------ re-quantization list
def test_config_path_from_the_env_is_required(tmp_path):
    assert config_path(tmp_path / "default.yaml", {CONFIG_ENV: str(tmp_path / "mine.yaml")}) == \
        (tmp_path / "mine.yaml", True)
    assert config_path(tmp_path / "default.yaml", {}) == (tmp_path / "default.yaml", False)
    assert config_path(tmp_path / "default.yaml", {CONFIG_ENV: ""}) == (tmp_path / "default.yaml", False)


def test_env_config_is_used(tmp_path):
    y = tmp_path / "mine.yaml"
    y.write_text("entries:\n  - {method: gptq, bits: 4, run_name: mine}\n")
    path, required = config_path(tmp_path / "missing-default.yaml", {CONFIG_ENV: str(y)})
    assert load_entries(None, path, required=required) == [{"method": "gptq", "bits": 4, "run_name": "mine"}]


def test_missing_env_config_fails_the_plan_naming_the_file_and_variable(tmp_path):
    path, required = config_path(REPO / "include" / "requantize.yaml", {CONFIG_ENV: str(tmp_path / "nope.yaml")})
    with pytest.raises(PlanError, match=rf"nope\.yaml does not exist.*{CONFIG_ENV}"):
        load_entries(None, path, required=required)
    # the Variable still wins over any file
    assert load_entries('[{"method": "w8a8", "bits": 8, "run_name": "v"}]', path, required=required)[0][
        "run_name"] == "v"


def test_missing_default_config_keeps_the_builtin_entries(tmp_path):
    path, required = config_path(tmp_path / "missing.yaml", {})
    assert load_entries(None, path, required=required) == DEFAULT_ENTRIES


def test_invalid_yaml_is_a_plan_error(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("entries: [unclosed\n")
    with pytest.raises(PlanError, match="not valid YAML"):
        load_entries(None, y)


def test_the_checkouts_requantize_yaml_still_loads():
    path, required = config_path(REPO / "include" / "requantize.yaml", {})
    assert load_entries(None, path, required=required)[0]["run_name"] == "smollm2-fp8"


def test_scheduled_dag_resolves_the_config_through_the_env():
    """dags/llm_requantize.py passes config_path(YAML_PATH)'s answer to load_entries (static
    check: importing the DAG needs Airflow; tests/scheduling/test_requantize_dags.py parses it)."""
    tree = ast.parse(DAG_FILE.read_text())
    calls = {n.func.id: n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert "config_path" in calls and [a.id for a in calls["config_path"].args] == ["YAML_PATH"]
    load = calls["load_entries"]
    assert {k.arg for k in load.keywords} == {"required"}
    assert isinstance(load.args[1], ast.Name) and load.args[1].id != "YAML_PATH"
