"""Stage 5 logic with fakes: settings, pre-flight, health comparison, proxy, switch-over, rollback.

The fake vLLM (fake_vllm.py) is a real detached process behind the real stable endpoint;
only the model server itself is faked.
"""

from __future__ import annotations

import json
import shutil
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from quantpipe.deployment import preflight as pf
from quantpipe.deployment.health import compare
from quantpipe.deployment.settings import DeploySettings
from quantpipe.errors import PipelineError

from .conftest import DATA, fake_model, free_port, params, write_validation
from quantpipe.store import Store

PROMPTS = ["The capital of France is", "Water boils at a temperature of"]
GOOD = {PROMPTS[0]: [7042, 30, 198, 198, 504], PROMPTS[1]: [1130, 216, 33, 28, 32]}


def gens(answers=GOOD):
    return [{"prompt": p, "token_ids": ids, "text": f"t{i}"} for i, (p, ids) in enumerate(answers.items())]


# ---- settings ------------------------------------------------------------------------------------------------

def test_settings_defaults_env_and_overrides():
    s = DeploySettings.load(environ={})
    assert s.host == "127.0.0.1" and s.command[-1].endswith("vllm_cpu.py")
    assert s.enforce_eager is None and s.resolved("cpu-avx2").enforce_eager  # per target: settings_defaults test
    s = DeploySettings.load({"max_num_seqs": 4}, environ={"QUANTPIPE_VLLM_CMD": "vllm",
                                                          "QUANTPIPE_DEPLOY_MAX_MODEL_LEN": "1024",
                                                          "QUANTPIPE_DEPLOY_BACKEND_PORTS": "9100-9110"})
    assert s.command == ["vllm"] and s.max_model_len == 1024 and s.max_num_seqs == 4 and s.backend_ports == (9100, 9110)


@pytest.mark.parametrize("bad, msg", [
    ({"host": "localhost.example"}, "must be an IP address"),
    ({"endpoint_port": 8150}, "inside backend_ports"),
    ({"max_num_seqs": 0}, "max_num_seqs"),
    ({"enable_chunked_prefill": False, "max_num_batched_tokens": 512, "max_model_len": 1024},
     "without chunked prefill"),
    ({"vllm_cmd": "  "}, "vllm_cmd is empty"),
])
def test_settings_refuse_bad_values(bad, msg):
    with pytest.raises(PipelineError, match=msg):
        DeploySettings.load(bad, environ={})


# ---- pre-flight ------------------------------------------------------------------------------------------------

def test_scheme_detection_on_llmcompressor_configs():
    assert pf.detect_scheme(json.loads((DATA / "config_fp8.json").read_text())) == "FP8_DYNAMIC"
    assert pf.detect_scheme(json.loads((DATA / "config_w4a16.json").read_text())) == "W4A16"
    assert pf.detect_scheme({"dtype": "bfloat16"}) == "BF16"
    w8a8 = {"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {"g": {
        "weights": {"type": "int", "num_bits": 8}, "input_activations": {"type": "int", "num_bits": 8}}}}}
    assert pf.detect_scheme(w8a8) == "W8A8"
    with pytest.raises(PipelineError, match="not compressed-tensors"):
        pf.detect_scheme({"quantization_config": {"quant_method": "gptq"}})


def _ckpt(tmp_path: Path, config: str = "config_fp8.json") -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(DATA / config, d / "config.json")
    (d / "model.safetensors").write_bytes(b"\0" * 4096)
    (d / "tokenizer.json").write_text("{}")
    (d / "tokenizer_config.json").write_text("{}")
    return d


def test_preflight_refuses_w4a16_on_avx2(tmp_path):
    s = DeploySettings.load({"state_dir": tmp_path / "st", "target": "cpu-avx2"}, environ={})
    with pytest.raises(pf.PreflightError, match="cannot serve W4A16.*cpu_gemm_wna16"):
        pf.run_preflight(_ckpt(tmp_path, "config_w4a16.json"), s)
    s512 = DeploySettings.load({"state_dir": tmp_path / "st", "target": "cpu-avx512"}, environ={})
    with pytest.raises(pf.PreflightError, match="no AVX512"):
        pf.run_preflight(tmp_path / "ckpt", s512, cpu_flags={"avx2"})
    assert pf.run_preflight(tmp_path / "ckpt", s512, cpu_flags={"avx2", "avx512f"}).scheme == "W4A16"


def test_preflight_accepts_fp8_and_sizes_memory(tmp_path):
    s = DeploySettings.load({"state_dir": tmp_path / "st"}, environ={})
    r = pf.run_preflight(_ckpt(tmp_path), s, mem_available=64 * pf.GiB)
    assert r.scheme == "FP8_DYNAMIC" and r.kv_bytes_per_token == 2 * 30 * 3 * 64 * 2
    with pytest.raises(pf.PreflightError, match="only 2.0 GiB of memory is available"):
        pf.run_preflight(tmp_path / "ckpt", s, mem_available=2 * pf.GiB)


@pytest.mark.parametrize("over, msg", [
    ({"max_model_len": 16384}, "exceeds the model's max_position_embeddings 8192"),
    ({"cpu_kvcache_space_gib": 0.01}, "raise cpu_kvcache_space_gib"),
    ({"min_free_disk_gib": 10 ** 6}, "GiB free"),
    ({"tensor_parallel_size": 2}, "does not divide the 9 attention heads"),
])
def test_preflight_limits(tmp_path, over, msg):
    s = DeploySettings.load({"state_dir": tmp_path / "st", **over}, environ={})
    with pytest.raises(pf.PreflightError, match=msg):
        pf.run_preflight(_ckpt(tmp_path), s, mem_available=64 * pf.GiB)


def test_preflight_missing_files(tmp_path):
    d = _ckpt(tmp_path)
    (d / "tokenizer.json").unlink()
    with pytest.raises(pf.PreflightError, match="lacks tokenizer.json"):
        pf.run_preflight(d, DeploySettings.load({"state_dir": tmp_path / "st"}, environ={}))


def test_report_checks(fake_env):
    s, store, tmp = fake_env
    m = fake_model(tmp, "m", GOOD)
    v = write_validation(store, "r1", m, gens())
    assert pf.check_report(v, m.as_uri(), Store.local())["passed"] is True
    with pytest.raises(pf.PreflightError, match="validation did not pass"):
        pf.check_report({**v, "passed": False}, m.as_uri(), Store.local())
    with pytest.raises(pf.PreflightError, match="not the approved model"):
        pf.check_report(v, (tmp / "other").as_uri(), Store.local())
    bad = write_validation(store, "r2", m, gens(), passed=False)
    with pytest.raises(pf.PreflightError, match="says passed=False"):
        pf.check_report({**bad, "passed": True}, m.as_uri(), Store.local())


# ---- health comparison -----------------------------------------------------------------------------------------

def test_compare_prefix_agreement():
    assert compare([1, 2, 3, 4], [1, 2, 3, 4]) == (4, 1.0)
    assert compare([1, 2, 3, 4], [1, 2, 9, 4]) == (2, 0.5)
    assert compare([1, 2], [7, 2]) == (0, 0.0)


# ---- the stable endpoint -----------------------------------------------------------------------------------------

def _upstream(tag: str):
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_GET(self):
            if self.path == "/stream":
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i in range(3):
                    data = f"data: {tag}-{i}\n\n".encode()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.write(b"0\r\n\r\n")
                return
            body = json.dumps({"upstream": tag, "auth": self.headers.get("Authorization")}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_proxy_switches_upstream_and_streams(fake_env):
    from quantpipe.deployment import switchover
    from quantpipe.deployment.server import ServerHandle

    s, _, _ = fake_env
    a, b = _upstream("a"), _upstream("b")
    try:
        switchover.ensure_proxy(s)
        url = switchover.endpoint_url(s)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "/v1/completions", data=b'{"prompt": "x"}')
        assert e.value.code == 503  # nothing deployed
        for srv, tag in ((a, "a"), (b, "b")):
            h = ServerHandle(pid=1, start_ticks=0, host="127.0.0.1", port=srv.server_address[1], model_dir="",
                             served_model_name="m", log_path="", launched_at=0, argv=[])
            switchover.switch_endpoint(s, h, None)  # one model served: requests naming none go to it
            req = urllib.request.Request(url + "/x", headers={"Authorization": "Bearer k"})
            assert json.loads(urllib.request.urlopen(req).read()) == {"upstream": tag, "auth": "Bearer k"}
            assert urllib.request.urlopen(url + "/stream").read() == "".join(
                f"data: {tag}-{i}\n\n" for i in range(3)).encode()
    finally:
        a.shutdown()
        b.shutdown()


# ---- switch-over and rollback with the fake server -------------------------------------------------------------

def _deploy(s, store, model, run):
    from quantpipe.deployment.api import deploy_approved

    v = write_validation(store, run, model, gens())
    return deploy_approved(params(), {"approved_uri": model.as_uri()}, v, run,
                           settings=s.model_dump(mode="json"), api_key="sekret-123", artifacts=Store.local())


def _ask(s):
    from quantpipe.deployment.health import request_json

    return request_json(f"http://127.0.0.1:{s.endpoint_port}/v1/completions",
                        {"model": "smollm2", "prompt": PROMPTS[0], "max_tokens": 5}, api_key="sekret-123")


def test_switchover_failure_paths_and_rollback(fake_env):
    from quantpipe.deployment import api, server, switchover
    from quantpipe.deployment.health import HealthError

    s, store, tmp = fake_env
    m1 = fake_model(tmp, "m1", GOOD)
    d1 = _deploy(s, store, m1, "run1")
    assert d1["endpoint_url"] == f"http://127.0.0.1:{s.endpoint_port}/v1" and d1["previous_record_uri"] is None
    assert _ask(s)["choices"][0]["text"] == "7042 30 198 198 504"
    # the key reached the server through its environment, never its argv or our logs
    log = Path(d1["log_path"]).read_text()
    assert "has_key True" in log and "sekret-123" not in log

    m2 = fake_model(tmp, "m2", GOOD)
    d2 = _deploy(s, store, m2, "run2")
    assert d2["port"] != d1["port"] and d2["previous_record_uri"] == d1["record_uri"]
    assert switchover.route(s, "smollm2")["upstream"].endswith(f":{d2['port']}")
    h1 = switchover.load_record(d1["record_uri"])[0].server
    assert not server.is_alive(h1), "the old server is stopped after the switch"

    # a launch that fails: the endpoint and the live server do not move
    broken = fake_model(tmp, "broken", GOOD, exit_code=1)
    with pytest.raises(server.LaunchError, match="(?s)exited during startup.*failing at startup as told"):
        _deploy(s, store, broken, "run3")
    # a server that answers differently from validation
    wrong = fake_model(tmp, "wrong", {PROMPTS[0]: [1, 2, 3, 4, 5], PROMPTS[1]: [1130, 216, 33, 28, 32]})
    with pytest.raises(HealthError, match="health check failed"):
        _deploy(s, store, wrong, "run4")
    # /health 200, then the engine dies on the first completion (W4A16 on AVX2 does this)
    dies = fake_model(tmp, "dies", GOOD, die_on_completion=True)
    with pytest.raises(HealthError):
        _deploy(s, store, dies, "run5")
    st = api.status("smollm2", settings=s.model_dump(mode="json"), artifacts=Store.local())
    assert st["record_uri"] == d2["record_uri"] and st["alive"] and st["endpoint"]["upstream"].endswith(f":{d2['port']}")
    assert _ask(s)["choices"][0]["text"] == "7042 30 198 198 504"

    r = api.rollback("smollm2", "rb1", settings=s.model_dump(mode="json"), artifacts=Store.local())
    assert r["kind"] == "rollback" and r["model_uri"] == m1.as_uri() and r["previous_record_uri"] is None
    assert not server.is_alive(switchover.load_record(d2["record_uri"])[0].server)
    assert _ask(s)["model"] == "smollm2"
    with pytest.raises(PipelineError, match="no previous record"):
        api.rollback("smollm2", "rb2", settings=s.model_dump(mode="json"), artifacts=Store.local())


def test_deploy_refuses_failed_validation(fake_env):
    from quantpipe.deployment.api import deploy_approved

    s, store, tmp = fake_env
    m = fake_model(tmp, "m", GOOD)
    v = write_validation(store, "r", m, gens(), passed=False)
    with pytest.raises(PipelineError, match="validation did not pass"):
        deploy_approved(params(), {"approved_uri": m.as_uri()}, v, "r", settings=s.model_dump(mode="json"), artifacts=Store.local())
    with pytest.raises(PipelineError, match="no approved_uri"):
        deploy_approved(params(), {}, v, "r", settings=s.model_dump(mode="json"), artifacts=Store.local())


# ---- health timeouts scale with the server's measured speed ------------------------------------------------------

def test_health_timeouts_scale_with_the_first_token():
    from quantpipe.deployment.health import TIMEOUT_SAFETY, scaled_timeout

    assert scaled_timeout(120, 0.05, 32) == 120  # a fast server: the configured timeout
    assert scaled_timeout(120, 2.0, 32) == pytest.approx(TIMEOUT_SAFETY * 2.0 * 33)  # a slow fallback
    assert scaled_timeout(10, 1.0, 0) == 10


def test_a_server_too_slow_for_one_token_is_named_with_what_to_try():
    import http.server
    import threading
    import time as _time

    from quantpipe.deployment.health import HealthError, first_token_latency

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            _time.sleep(float(self.server.delay))
            body = b'{"choices": [{"text": " x", "logprobs": {"tokens": ["token_id:7"]}}]}'
            try:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:
                pass

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        srv.delay = 0.3
        assert 0.3 <= first_token_latency(url, "m", "p", None, timeout_s=5) < 5
        srv.delay = 2.0
        with pytest.raises(HealthError, match="far too slow.*W8A8"):
            first_token_latency(url, "m", "p", None, timeout_s=0.5)
    finally:
        srv.shutdown()
