"""The stable endpoint with several models: routing by the OpenAI ``model`` field, per-model switch-over,
requests in flight drained before a server stops, the status page behind the API key.

The proxy is the real one (in a thread of this test) and the upstreams are small HTTP servers on
127.0.0.1; each test builds its own, nothing is shared between tests.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from quantpipe.deployment import proxy, switchover
from quantpipe.deployment.server import ServerHandle

from .conftest import make_settings

KEY = "proxy-key-77"


class Upstream:
    """A stand-in vLLM server answering as ``name``; a completion whose prompt is "slow" takes ``delay`` s."""

    def __init__(self, name: str, tag: str, key: str | None = None, delay: float = 2.0):
        self.name, self.tag, self.key, self.delay = name, tag, key, delay
        self.started = threading.Event()
        up = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def send(self, code, body, ctype="application/json"):
                data = (json.dumps(body) if isinstance(body, dict) else body).encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def authorized(self):
                if up.key and self.headers.get("Authorization") != f"Bearer {up.key}":
                    self.send(401, {"error": "Unauthorized"})
                    return False
                return True

            def do_GET(self):
                if self.path == "/health":
                    return self.send(200, "", "text/plain")
                if self.path == "/metrics":
                    return self.send(200, "# HELP vllm:requests_total Requests.\n# TYPE vllm:requests_total counter\n"
                                          f'vllm:requests_total{{model_name="{up.name}"}} 3.0\n'
                                          "# HELP process_cpu_seconds_total CPU.\n"
                                          "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 1.5\n",
                                     "text/plain")
                if self.path == "/v1/models" and self.authorized():
                    return self.send(200, {"object": "list", "data": [{"id": up.name, "object": "model",
                                                                        "root": f"/models/{up.tag}"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if not self.authorized():
                    return
                if body.get("model") != up.name:
                    return self.send(404, {"error": f"model {body.get('model')} not here"})
                if body.get("prompt") == "slow":
                    up.started.set()
                    time.sleep(up.delay)
                if body.get("stream"):
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(3):
                        data = f"data: {up.tag}-{i}\n\n".encode()
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.write(b"0\r\n\r\n")
                    return
                self.send(200, {"model": up.name, "upstream": up.tag, "choices": [{"text": up.tag}]})

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.srv.daemon_threads = True
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    @property
    def handle(self) -> ServerHandle:
        return ServerHandle(pid=1, start_ticks=0, host="127.0.0.1", port=self.srv.server_address[1],
                            model_dir=f"/models/{self.tag}", served_model_name=self.name, log_path="",
                            launched_at=0, argv=[])

    @property
    def url(self) -> str:
        return self.handle.base_url

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


@pytest.fixture
def endpoint(tmp_path):
    """The real proxy serving this test's state file, and a factory of upstreams closed afterwards."""
    s = make_settings(tmp_path / "state", drain_timeout_s=30)
    srv = proxy.make_server(switchover.proxy_files(s)[0], "127.0.0.1", s.endpoint_port, timeout=30)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    ups: list[Upstream] = []

    def upstream(name, tag, **kw):
        ups.append(Upstream(name, tag, **kw))
        return ups[-1]

    yield s, upstream
    srv.shutdown()
    srv.server_close()
    for u in ups:
        u.close()


def call(s, path, body=None, key=KEY, method=None, timeout=30):
    """(status, parsed JSON or text, headers) of one request to the endpoint."""
    req = urllib.request.Request(f"{switchover.endpoint_url(s)}{path}",
                                 data=json.dumps(body).encode() if body is not None else None, method=method,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            code, raw, headers = r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        code, raw, headers = e.code, e.read(), e.headers
    try:
        return code, json.loads(raw), headers
    except ValueError:
        return code, raw.decode(), headers


def complete(s, model, prompt="hi", **kw):
    return call(s, "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 4, **kw})


def test_requests_are_routed_by_model_and_every_model_is_listed(endpoint):
    s, upstream = endpoint
    a, b = upstream("alpha", "a1"), upstream("beta", "b1")
    switchover.switch_endpoint(s, a.handle, None, KEY)
    switchover.switch_endpoint(s, b.handle, None, KEY)
    assert complete(s, "alpha")[1]["upstream"] == "a1"
    assert complete(s, "beta")[1]["upstream"] == "b1"
    assert call(s, "/v1/chat/completions", {"model": "beta", "messages": []})[1]["upstream"] == "b1"
    code, models, _ = call(s, "/v1/models")
    assert code == 200 and sorted(m["id"] for m in models["data"]) == ["alpha", "beta"]
    # streaming passes through chunk by chunk, routed by the body's model
    req = urllib.request.Request(f"{switchover.endpoint_url(s)}/v1/completions",
                                 data=json.dumps({"model": "beta", "prompt": "x", "stream": True}).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    assert urllib.request.urlopen(req, timeout=10).read() == b"data: b1-0\n\ndata: b1-1\n\ndata: b1-2\n\n"
    # an unknown model: OpenAI's 404 error naming it
    code, err, _ = complete(s, "gamma")
    assert code == 404 and err["error"]["code"] == "model_not_found" and err["error"]["param"] == "model"
    assert "`gamma`" in err["error"]["message"] and err["error"]["type"] == "invalid_request_error"
    # no model named while several serve: 400 saying which exist
    code, err, _ = call(s, "/v1/completions", {"prompt": "x"})
    assert code == 400 and "alpha, beta" in err["error"]["message"]


def test_one_model_switches_over_and_leaves_the_other_alone(endpoint):
    s, upstream = endpoint
    a, b1, b2 = upstream("alpha", "a1"), upstream("beta", "b1"), upstream("beta", "b2")
    switchover.switch_endpoint(s, a.handle, None, KEY)
    switchover.switch_endpoint(s, b1.handle, None, KEY)
    switchover.switch_endpoint(s, b2.handle, None, KEY)  # deploying beta again: alpha stays where it was
    assert complete(s, "beta")[1]["upstream"] == "b2" and complete(s, "alpha")[1]["upstream"] == "a1"
    routes = switchover.endpoint_status(s)["routes"]
    assert routes["alpha"]["upstream"] == a.url and routes["beta"]["upstream"] == b2.url
    # beta is being replaced (drain-and-replace): 503 + Retry-After for it, alpha unaffected
    switchover.hold_route(s, "beta", KEY)
    code, err, headers = complete(s, "beta")
    assert code == 503 and err["error"]["code"] == "model_switching" and headers["Retry-After"]
    assert complete(s, "alpha")[1]["upstream"] == "a1"
    # beta taken off the endpoint: it no longer exists there; alpha still serves and is still listed
    switchover.drop_route(s, "beta")
    assert complete(s, "beta")[0] == 404 and complete(s, "alpha")[0] == 200
    assert [m["id"] for m in call(s, "/v1/models")[1]["data"]] == ["alpha"]
    # the only model left also takes requests that name none (clients of the one-model endpoint)
    assert call(s, "/v1/completions", {"prompt": "x", "model": "alpha"})[1]["upstream"] == "a1"


def test_a_slow_request_in_flight_finishes_before_its_server_is_drained(endpoint):
    s, upstream = endpoint
    old, new = upstream("alpha", "old", delay=2.0), upstream("alpha", "new")
    switchover.switch_endpoint(s, old.handle, None, KEY)
    out = {}
    t = threading.Thread(target=lambda: out.update(r=complete(s, "alpha", prompt="slow")))
    t.start()
    assert old.started.wait(10), "the slow request reached the old server"
    st = switchover.proxy_status(s, KEY)
    assert st["in_flight"] == {old.url: 1} and st["routes"]["alpha"]["in_flight"] == 1
    t0 = time.monotonic()
    switchover.switch_endpoint(s, new.handle, None, KEY)
    assert complete(s, "alpha")[1]["upstream"] == "new", "new requests go to the new server at once"
    d = switchover.drain(s, old.url, KEY, timeout=30)
    waited = time.monotonic() - t0
    t.join(10)
    assert d["drained"] and d["in_flight_at_start"] == 1 and d["in_flight_left"] == 0
    assert 0.5 < waited < 10 and d["waited_s"] > 0.5, d
    code, body, _ = out["r"]
    assert code == 200 and body["upstream"] == "old", "the request started before the switch completed"
    assert switchover.proxy_status(s, KEY)["in_flight"] == {}


def test_drain_gives_up_after_its_timeout(endpoint):
    s, upstream = endpoint
    old = upstream("alpha", "old", delay=3.0)
    switchover.switch_endpoint(s, old.handle, None, KEY)
    t = threading.Thread(target=lambda: complete(s, "alpha", prompt="slow"))
    t.start()
    assert old.started.wait(10)
    switchover.hold_route(s, "alpha", KEY)
    d = switchover.drain(s, old.url, KEY, timeout=0.5)
    assert not d["drained"] and d["in_flight_left"] == 1 and d["waited_s"] >= 0.5
    t.join(10)


def test_status_page_needs_the_key_and_hides_paths_without_one(endpoint):
    s, upstream = endpoint
    a = upstream("alpha", "a1")
    switchover.switch_endpoint(s, a.handle, "file:///store/deployments/alpha/records/r1", KEY)
    for key in (None, "wrong"):
        code, err, headers = call(s, "/proxy/status", key=key)
        assert code == 401 and "model_dir" not in json.dumps(err) and headers["WWW-Authenticate"] == "Bearer"
        # nor can an unknown caller learn which models exist
        assert call(s, "/v1/completions", {"model": "gamma"}, key=key)[0] == 401
        assert call(s, "/v1/models", key=key)[0] == 401
    code, st, _ = call(s, "/proxy/status")
    assert code == 200 and st["routes"]["alpha"]["model_dir"] == "/models/a1" and st["protocol"] == proxy.PROTOCOL
    assert "key_sha256" not in json.dumps(st) and KEY not in json.dumps(st)
    assert KEY not in switchover.proxy_files(s)[0].read_text(), "the state file holds a digest, never the key"
    assert call(s, "/proxy/ping", key=None)[:2] == (200, {"proxy": "quantpipe", "protocol": proxy.PROTOCOL})


def test_without_any_key_the_status_page_leaves_paths_out(endpoint):
    s, upstream = endpoint
    a = upstream("alpha", "a1")
    switchover.switch_endpoint(s, a.handle, "file:///store/deployments/alpha/records/r1")
    code, st, _ = call(s, "/proxy/status", key=None)
    assert code == 200 and st["routes"]["alpha"]["upstream"] == a.url
    assert "/models/a1" not in json.dumps(st) and "file://" not in json.dumps(st)
    assert complete(s, "gamma")[0] == 404


def test_health_and_metrics_cover_every_model(endpoint):
    s, upstream = endpoint
    assert call(s, "/health", key=None)[0] == 503  # nothing deployed
    a, b = upstream("alpha", "a1"), upstream("beta", "b1")
    switchover.switch_endpoint(s, a.handle, None)
    code, h, _ = call(s, "/health", key=None)
    assert code == 200 and h["models"] == {"alpha": "ok"}
    one = call(s, "/metrics", key=None)[1]
    assert 'vllm:requests_total{model_name="alpha"} 3.0' in one  # one model: vLLM's text as it is
    switchover.switch_endpoint(s, b.handle, None)
    merged = call(s, "/metrics", key=None)[1]
    assert merged.count("# TYPE vllm:requests_total counter") == 1
    assert 'vllm:requests_total{model_name="alpha",served_model="alpha"} 3.0' in merged
    assert 'vllm:requests_total{model_name="beta",served_model="beta"} 3.0' in merged
    assert 'process_cpu_seconds_total{served_model="beta"} 1.5' in merged
    assert call(s, "/metrics?model=beta", key=None)[1].count("process_cpu_seconds_total 1.5") == 1
    b.close()
    code, h, _ = call(s, "/health", key=None)
    assert code == 200 and h["models"] == {"alpha": "ok", "beta": "down"}


def test_a_one_upstream_state_file_reads_as_one_route(tmp_path):
    """A state written by the one-model endpoint (protocol 1) is served as that model's route."""
    p = tmp_path / "endpoint.json"
    p.write_text(json.dumps({"upstream": "http://127.0.0.1:8101", "model": "smollm2", "model_dir": "/m",
                             "pid": 5, "record_uri": None}))
    st = proxy.read_state(p)
    assert st["routes"]["smollm2"]["upstream"] == "http://127.0.0.1:8101" and st["routes"]["smollm2"]["state"] == \
        "serving"
    assert proxy.read_state(tmp_path / "missing.json")["routes"] == {}
