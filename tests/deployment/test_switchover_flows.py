"""Deploys through ``deploy_approved`` with the fake vLLM (real detached processes behind the real
endpoint): two names behind one endpoint switching over independently, the decision taken from the
memory read (a fake reading here), drain-and-replace, and the automatic rollback when the new server
fails its launch or health check. Each test has its own store, state, ports and endpoint."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from quantpipe.deployment import api, placement, server, switchover

from .conftest import fake_model, params, write_validation
from quantpipe.store import Store

KEY = "flow-key-9"
PROMPT = "The capital of France is"
GOOD = {PROMPT: [7042, 30, 198, 198, 504]}
GiB = placement.GiB


def gens(answers=GOOD):
    return [{"prompt": p, "token_ids": ids, "text": f"t{i}"} for i, (p, ids) in enumerate(answers.items())]


def deploy(s, store, model, name, run, **settings):
    v = write_validation(store, run, model, gens())
    return api.deploy_approved(params(name), {"approved_uri": model.as_uri()}, v, run,
                               settings={**s.model_dump(mode="json"), **settings}, api_key=KEY, artifacts=Store.local())


def ask(s, model, key=KEY):
    req = urllib.request.Request(f"http://127.0.0.1:{s.endpoint_port}/v1/completions",
                                 data=json.dumps({"model": model, "prompt": PROMPT, "max_tokens": 5}).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def memory(monkeypatch, avail_gib: float) -> list:
    """The host's available memory as the switch-over reads it (fake); returns the list of readings made."""
    made = []

    def read(target, cmd=None):
        made.append(target)
        return placement.MemoryReading("cpu", "fake meminfo", available_bytes=int(avail_gib * GiB))
    monkeypatch.setattr(placement, "read_memory", read)
    return made


def test_two_names_behind_one_endpoint_switch_over_independently(fake_env, monkeypatch):
    s, store, tmp = fake_env
    read = memory(monkeypatch, 64)
    a = deploy(s, store, fake_model(tmp, "a1", GOOD), "alpha", "ra1")
    b = deploy(s, store, fake_model(tmp, "b1", GOOD), "beta", "rb1")
    assert a["switchover"]["mode"] == b["switchover"]["mode"] == "fresh" and read == []  # nothing to replace
    assert ask(s, "alpha") == (200, ask(s, "alpha")[1]) and ask(s, "alpha")[1]["model"] == "alpha"
    assert ask(s, "beta")[1]["model"] == "beta"
    # B's deploy did not hide A: both listed, both served, A's server untouched
    with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{s.endpoint_port}/v1/models",
                                                       headers={"Authorization": f"Bearer {KEY}"})) as r:
        assert sorted(m["id"] for m in json.loads(r.read())["data"]) == ["alpha", "beta"]

    b2 = deploy(s, store, fake_model(tmp, "b2", GOOD), "beta", "rb2")
    assert b2["switchover"]["mode"] == "beside" and "64.0 GiB available" in b2["switchover"]["reason"]
    assert b2["switchover"]["drain"]["drained"] and read == ["cpu-avx512" if "avx512f" in open(
        "/proc/cpuinfo").read() else "cpu-avx2"]
    assert not server.is_alive(switchover.load_record(b["record_uri"])[0].server)
    assert server.is_alive(switchover.load_record(a["record_uri"])[0].server), "alpha's server kept serving"
    assert api.status("alpha", settings=s.model_dump(mode="json"), artifacts=Store.local())["pid"] == a["pid"]
    rec = switchover.load_record(b2["record_uri"])[0]
    assert rec.switchover["mode"] == "beside" and rec.switchover["memory"]["available_bytes"] == 64 * GiB

    # beta rolls back on its own; alpha's route and server stay as they were
    r = api.rollback("beta", "rbb", api_key=KEY, settings=s.model_dump(mode="json"), artifacts=Store.local())
    assert r["model_uri"] == (tmp / "b1").as_uri() and r["kind"] == "rollback"
    assert switchover.route(s, "alpha")["upstream"] == a["server_url"]
    assert ask(s, "alpha")[0] == ask(s, "beta")[0] == 200
    code, err = ask(s, "gamma")
    assert code == 404 and "`gamma`" in err["error"]["message"]
    # taking beta down leaves the endpoint up for alpha
    switchover.teardown(store, s, "beta")
    assert ask(s, "beta")[0] == 404 and ask(s, "alpha")[0] == 200


def test_drain_and_replace_when_memory_is_short_and_automatic_rollback(fake_env, monkeypatch):
    s, store, tmp = fake_env
    memory(monkeypatch, 0.5)
    m1, m2 = fake_model(tmp, "m1", GOOD), fake_model(tmp, "m2", GOOD)
    d1 = deploy(s, store, m1, "alpha", "r1")
    other = deploy(s, store, fake_model(tmp, "o1", GOOD), "beta", "o1")
    d2 = deploy(s, store, m2, "alpha", "r2")
    sw = d2["switchover"]
    assert sw["mode"] == "drain-and-replace" and "only 0.5 GiB is available beside the old server" in sw["reason"]
    assert sw["drain"]["drained"] and sw["unavailable_seconds"] > 0
    assert not server.is_alive(switchover.load_record(d1["record_uri"])[0].server)
    assert ask(s, "alpha")[0] == 200 and d2["previous_record_uri"] == d1["record_uri"]

    # a launch that dies after the old server stopped: the old model is started again
    broken = fake_model(tmp, "broken", GOOD, exit_code=1)
    with pytest.raises(server.LaunchError) as e:
        deploy(s, store, broken, "alpha", "r3")
    msg = str(e.value)
    assert msg.startswith("deploy failed: vLLM exited during startup")
    assert msg.index(". Automatic rollback: the previous model (FP8_DYNAMIC, ") < msg.index("Try:")
    assert m2.as_uri() in msg and "serves again" in msg
    st = api.status("alpha", settings=s.model_dump(mode="json"), artifacts=Store.local())
    assert st["alive"] and st["kind"] == "restore" and st["model_uri"] == m2.as_uri()
    assert st["previous_record_uri"] == d1["record_uri"], "the chain is as if the failed deploy never happened"
    rec = switchover.load_record(st["record_uri"])[0]
    assert rec.switchover["restored_after"].startswith(f"deploy of {broken.as_uri()} failed")
    assert ask(s, "alpha")[0] == 200

    # a server that answers unlike the validated model: same, the old model serves again
    wrong = fake_model(tmp, "wrong", {PROMPT: [1, 2, 3, 4, 5]})
    with pytest.raises(Exception, match="health check failed") as e:
        deploy(s, store, wrong, "alpha", "r4")
    assert "Automatic rollback" in str(e.value)
    assert api.status("alpha", settings=s.model_dump(mode="json"), artifacts=Store.local())["model_uri"] == m2.as_uri()
    # beta was never touched
    assert api.status("beta", settings=s.model_dump(mode="json"), artifacts=Store.local())["pid"] == other["pid"]
    assert ask(s, "beta")[0] == 200

    # a manual rollback from the restored record goes to the model before m2
    r = api.rollback("alpha", "rb", api_key=KEY, settings=s.model_dump(mode="json"), artifacts=Store.local())
    assert r["model_uri"] == m1.as_uri() and r["switchover"]["mode"] == "drain-and-replace"


def test_when_the_old_model_cannot_start_again_the_error_says_nothing_serves(fake_env, monkeypatch):
    s, store, tmp = fake_env
    m1 = fake_model(tmp, "m1", GOOD)
    deploy(s, store, m1, "alpha", "r1")
    spec = json.loads((m1 / "fake.json").read_text())
    (m1 / "fake.json").write_text(json.dumps({**spec, "exit_code": 2}))  # it will not start again
    with pytest.raises(server.LaunchError) as e:
        deploy(s, store, fake_model(tmp, "broken", GOOD, exit_code=1), "alpha", "r2",
               switchover="drain-and-replace")
    assert "Starting the previous model again failed too, so nothing serves this name now" in str(e.value)
    code, err = ask(s, "alpha")
    assert code == 404 and switchover.route(s, "alpha") is None


def test_a_forced_beside_never_reads_memory(fake_env, monkeypatch):
    s, store, tmp = fake_env
    read = memory(monkeypatch, 0.1)
    deploy(s, store, fake_model(tmp, "m1", GOOD), "alpha", "r1")
    d = deploy(s, store, fake_model(tmp, "m2", GOOD), "alpha", "r2", switchover="beside")
    assert d["switchover"]["mode"] == "beside" and d["switchover"]["reason"].startswith("configured") and read == []
