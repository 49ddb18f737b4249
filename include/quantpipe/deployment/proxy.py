"""The stable endpoint: a small stdlib reverse proxy on a fixed port, several models behind it.

Clients always call ``http://HOST:ENDPOINT_PORT/v1/...``. Requests are routed by the
OpenAI ``model`` field of their JSON body to that model's upstream vLLM server, named in a
JSON state file (one route per served name, i.e. per ``run_name``); switch-over rewrites
one route at a time (``update_state``, atomic, under a file lock), so several models serve
at once and each switches over without touching the others. ``GET /v1/models`` lists
every served model (each upstream's own answer, merged). A request for a model that is not
served gets an OpenAI-style 404 error naming it; one for a model being replaced
(drain-and-replace) gets 503 with ``Retry-After``.

The proxy counts requests in flight per upstream (the route is picked and the count
raised under one lock), so the switch-over can stop routing new requests to a server and
then wait until the ones already sent to it have finished before it stops it
(``switchover.drain``). Streaming (SSE) responses are passed through chunk by chunk.

Its own pages: ``GET /proxy/status`` (routes, upstreams, requests in flight, the state
version it has loaded) needs the API key (``Authorization: Bearer``; 401 without) when a
key is configured for any route; the proxy holds only salted SHA-256 digests of the keys
(in the state file), never a key. Without any key configured it answers, with filesystem
paths left out. ``GET /proxy/ping`` (no secrets) says the proxy runs and its protocol.
``/health`` answers for the endpoint (200 while at least one model is up), ``/metrics``
is each upstream's vLLM metrics (merged, with a ``served_model`` label, when several
serve; ``?model=NAME`` for one). vLLM checks the key itself on forwarded requests.

Run: ``python -m quantpipe.deployment.proxy --state FILE --host 127.0.0.1 --port 8000``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import hmac
import http.client
import json
import os
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, urlparse

PROTOCOL = 2  # state format / admin API; ensure_proxy restarts a proxy that speaks an older one
HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
       "transfer-encoding", "upgrade", "host", "content-length"}
PATH_KEYS = ("model_dir", "record_uri", "log_path")  # left out of the status page for unauthenticated callers


# ---- the state file ------------------------------------------------------------------------------------------------

def write_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(state, indent=1))
    os.replace(tmp, path)


def _upgrade(state: dict) -> dict:
    """A protocol-1 state (one upstream) read as one route."""
    if "routes" in state or not state.get("upstream"):
        return {"version": state.get("version", 0), "routes": state.get("routes", {}), "salt": state.get("salt")}
    name = state.get("model") or "default"
    route = {k: state.get(k) for k in ("upstream", "model_dir", "pid", "record_uri", "switched_at")}
    return {"version": 0, "routes": {name: {**route, "state": "serving"}}, "salt": None}


def read_state(path: Path) -> dict:
    try:
        return _upgrade(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError):
        return {"version": 0, "routes": {}, "salt": None}


@contextlib.contextmanager
def _state_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def update_state(path: Path, change: Callable[[dict], None]) -> dict:
    """Read-modify-write the state under a lock (deploys of different names may run at once); bumps the
    version. Returns the new state."""
    with _state_lock(path):
        state = read_state(path)
        if not state.get("salt"):
            state["salt"] = os.urandom(16).hex()
        change(state)
        state["version"] = int(state.get("version") or 0) + 1
        write_state(path, state)
        return state


def key_digest(salt: str, key: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + key.encode()).hexdigest()


def route_entry(upstream: str | None, *, state: str = "serving", api_key: str | None = None, salt: str,
                **info) -> dict:
    """One route: ``state`` serving (requests go to ``upstream``) or switching (503, Retry-After)."""
    entry = {"upstream": upstream, "state": state, **info}
    if api_key:
        entry["key_sha256"] = key_digest(salt, api_key)
    return entry


# ---- the proxy -----------------------------------------------------------------------------------------------------

class _State:
    """The state file as last loaded, and the requests in flight per upstream (one lock for both)."""

    def __init__(self, path: Path):
        self.path, self._stamp, self._value, self.lock = path, None, read_state(Path("/nonexistent")), threading.Lock()
        self.in_flight: dict[str, int] = {}

    def _load(self, force: bool = False) -> dict:  # call with the lock held
        try:
            st = self.path.stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if force or stamp != self._stamp:
            self._value, self._stamp = read_state(self.path), stamp
        return self._value

    def get(self, force: bool = False) -> dict:
        with self.lock:
            return self._load(force)

    def acquire(self, model: str | None) -> tuple[str, dict | None, str | None]:
        """Pick the route for ``model`` and count the request in flight on its upstream, atomically.
        Returns (resolved name, route or None, upstream when acquired)."""
        with self.lock:
            routes = self._load()["routes"]
            if model is None and len(routes) == 1:
                model = next(iter(routes))
            route = routes.get(model) if model is not None else None
            up = route.get("upstream") if route and route.get("state") == "serving" else None
            if up:
                self.in_flight[up] = self.in_flight.get(up, 0) + 1
            return model, route, up

    def release(self, upstream: str) -> None:
        with self.lock:
            n = self.in_flight.get(upstream, 0) - 1
            if n > 0:
                self.in_flight[upstream] = n
            else:
                self.in_flight.pop(upstream, None)

    def snapshot(self) -> tuple[dict, dict]:
        """(state, requests in flight): the state reloaded, so every request after this one sees it."""
        with self.lock:
            return self._load(force=True), dict(self.in_flight)


def _openai_error(message: str, type_: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?(\s.*)$")


def merge_metrics(texts: dict[str, str]) -> str:
    """Prometheus text from several servers as one exposition: each family's HELP/TYPE once, every sample
    labelled ``served_model`` (the servers' process metrics would otherwise collide)."""
    families: dict[str, tuple[list[str], list[str]]] = {}
    for model, text in texts.items():
        fam = None
        esc = model.replace("\\", "\\\\").replace('"', '\\"')
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                fam = line.split()[2]
                head, _ = families.setdefault(fam, ([], []))
                if line not in head:
                    head.append(line)
                continue
            if not line.strip() or line.startswith("#"):
                continue
            m = _SAMPLE.match(line)
            if not m:
                continue
            name, labels, rest = m.groups()
            labels = f'{labels},served_model="{esc}"' if labels else f'served_model="{esc}"'
            families.setdefault(fam or name, ([], []))[1].append(f"{name}{{{labels}}}{rest}")
    out = []
    for head, samples in families.values():
        out += head + samples
    return "\n".join(out) + "\n"


def make_handler(state: _State, timeout: float):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # one line per request, no headers (they may carry the key)
            sys.stderr.write("%s %s\n" % (self.address_string(), fmt % args))

        def _reply(self, code: int, body: dict | str, headers: dict | None = None,
                   ctype: str = "application/json") -> None:
            data = (json.dumps(body) if isinstance(body, dict) else body).encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        # -- auth --
        def _authorized(self, st: dict) -> tuple[bool, bool]:
            """(authorized, any key configured): the bearer matches a route's key digest."""
            digests = [r["key_sha256"] for r in st["routes"].values() if r.get("key_sha256")]
            if not digests:
                return True, False
            auth = self.headers.get("Authorization") or ""
            if not auth.startswith("Bearer ") or not st.get("salt"):
                return False, True
            got = key_digest(st["salt"], auth[7:].strip())
            return any(hmac.compare_digest(got, d) for d in digests), True

        def _unauthorized(self) -> None:
            self._reply(401, _openai_error("Missing or invalid API key (Authorization: Bearer <key>)",
                                           "invalid_request_error", "invalid_api_key"),
                        {"WWW-Authenticate": "Bearer"})

        # -- the proxy's own pages --
        def _status(self) -> None:
            st, flying = state.snapshot()
            ok, keyed = self._authorized(st)
            if not ok:
                return self._unauthorized()
            routes = {}
            for name, r in st["routes"].items():
                r = {k: v for k, v in r.items() if k != "key_sha256" and (keyed or k not in PATH_KEYS)}
                r["in_flight"] = flying.get(r.get("upstream"), 0) if r.get("upstream") else 0
                routes[name] = r
            self._reply(200, {"protocol": PROTOCOL, "version": st.get("version", 0), "routes": routes,
                              "in_flight": flying})

        def _upstream_get(self, up: str, path: str, t: float = 10) -> tuple[int, bytes]:
            u = urlparse(up)
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=t)
            try:
                auth = self.headers.get("Authorization")
                conn.request("GET", path, headers={"Authorization": auth} if auth else {})
                r = conn.getresponse()
                return r.status, r.read()
            finally:
                conn.close()

        def _serving(self, st: dict, only: str | None = None) -> dict[str, str]:
            return {n: r["upstream"] for n, r in st["routes"].items()
                    if r.get("state") == "serving" and r.get("upstream") and (only is None or n == only)}

        def _models(self) -> None:
            st = state.get()
            ok, _ = self._authorized(st)
            if not ok:
                return self._unauthorized()
            data, last = [], None
            for up in self._serving(st).values():
                try:
                    code, body = self._upstream_get(up, "/v1/models")
                    if code == 200:
                        data += [m for m in json.loads(body).get("data", [])
                                 if m.get("id") not in {d.get("id") for d in data}]
                    else:
                        last = (code, body)
                except (OSError, ValueError):
                    continue
            if not data and last is not None:  # e.g. every upstream said 401: say what they said
                return self._reply(last[0], last[1].decode(errors="replace"))
            self._reply(200, {"object": "list", "data": data})

        def _health(self, only: str | None) -> None:
            st = state.get()
            models = {n: r.get("state", "?") for n, r in st["routes"].items() if only is None or n == only}
            for name, up in self._serving(st, only).items():
                try:
                    models[name] = "ok" if self._upstream_get(up, "/health", 5)[0] == 200 else "down"
                except OSError:
                    models[name] = "down"
            up_ = any(v == "ok" for v in models.values())
            self._reply(200 if up_ else 503, {"status": "ok" if up_ else "unavailable", "models": models})

        def _metrics(self, only: str | None) -> None:
            texts = {}
            for name, up in self._serving(state.get(), only).items():
                try:
                    code, body = self._upstream_get(up, "/metrics")
                except OSError:
                    continue
                if code == 200:
                    texts[name] = body.decode(errors="replace")
            if not texts:
                return self._reply(503, {"error": "no model serves behind this endpoint"})
            text = next(iter(texts.values())) if len(texts) == 1 else merge_metrics(texts)
            self._reply(200, text, ctype="text/plain; version=0.0.4; charset=utf-8")

        # -- forwarding --
        def _forward(self) -> None:
            url = urlparse(self.path)
            query = parse_qs(url.query)
            only = (query.get("model") or [None])[0]
            if url.path == "/proxy/ping":
                return self._reply(200, {"proxy": "quantpipe", "protocol": PROTOCOL})
            if url.path == "/proxy/status":
                return self._status()
            if self.command == "GET" and url.path == "/v1/models":
                return self._models()
            if self.command == "GET" and url.path == "/health":
                return self._health(only)
            if self.command == "GET" and url.path == "/metrics":
                return self._metrics(only)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            model = only
            if body and "json" in (self.headers.get("Content-Type") or "application/json"):
                try:
                    parsed = json.loads(body)
                    if isinstance(parsed, dict) and isinstance(parsed.get("model"), str):
                        model = parsed["model"]
                except ValueError:
                    pass
            name, route, up = state.acquire(model)
            if up is None:
                st = state.get()
                ok, _ = self._authorized(st)
                if not ok:
                    return self._unauthorized()
                if name is None:
                    served = sorted(st["routes"])
                    if not served:
                        return self._reply(503, _openai_error("no model is deployed behind this endpoint",
                                                              "service_unavailable", None))
                    return self._reply(400, _openai_error(
                        f"several models are served here ({', '.join(served)}): name one in the request's "
                        "'model' field", "invalid_request_error", "model_required", "model"))
                if route is None:
                    return self._reply(404, _openai_error(f"The model `{name}` does not exist.",
                                                          "invalid_request_error", "model_not_found", "model"))
                return self._reply(503, _openai_error(f"The model `{name}` is being switched over; retry shortly.",
                                                      "service_unavailable", "model_switching", "model"),
                                   {"Retry-After": "5"})
            try:
                self._relay(up, body)
            finally:
                state.release(up)

        def _relay(self, up: str, body: bytes | None) -> None:
            u = urlparse(up)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
            except OSError as e:
                conn.close()
                return self._reply(502, _openai_error(f"upstream unreachable: {e.__class__.__name__}",
                                                      "bad_gateway", None))
            try:
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP:
                        self.send_header(k, v)
                clen = resp.getheader("Content-Length")
                if clen is not None:
                    self.send_header("Content-Length", clen)
                    self.end_headers()
                    self.wfile.write(resp.read())
                else:
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    while True:
                        chunk = resp.read1(65536)
                        if not chunk:
                            break
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
            finally:
                conn.close()

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward

    return Handler


def make_server(state_path: Path, host: str, port: int, timeout: float = 600) -> ThreadingHTTPServer:
    srv = ThreadingHTTPServer((host, port), make_handler(_State(state_path), timeout))
    srv.daemon_threads = True
    return srv


def serve(state_path: Path, host: str, port: int, timeout: float = 600) -> None:
    srv = make_server(state_path, host, port, timeout)
    sys.stderr.write(f"stable endpoint on http://{host}:{port} (state {state_path})\n")
    sys.stderr.flush()
    srv.serve_forever()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state", required=True, type=Path)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--timeout", type=float, default=600)
    a = ap.parse_args(argv)
    serve(a.state, a.host, a.port, a.timeout)


if __name__ == "__main__":
    main()
