"""The stable endpoint: a small stdlib reverse proxy on a fixed port.

Clients always call ``http://HOST:ENDPOINT_PORT/v1/...``. The proxy forwards each
request to the upstream named in a JSON state file; switch-over rewrites that
file atomically (``write_state``) once the new server is healthy, so the next
request goes to the new server and in-flight ones finish on the old one.
Streaming (SSE) responses are passed through chunk by chunk.

Run: ``python -m quantpipe.deployment.proxy --state FILE --host 127.0.0.1 --port 8000``.
``GET /proxy/status`` answers with the state (upstream, model, record).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
       "transfer-encoding", "upgrade", "host", "content-length"}


def write_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


def read_state(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


class _State:
    def __init__(self, path: Path):
        self.path, self._mtime, self._value, self._lock = path, None, {}, threading.Lock()

    def get(self) -> dict:
        try:
            m = self.path.stat().st_mtime_ns
        except OSError:
            return {}
        with self._lock:
            if m != self._mtime:
                self._value, self._mtime = read_state(self.path), m
            return self._value


def make_handler(state: _State, timeout: float):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # one line per request, no headers (they may carry the key)
            sys.stderr.write("%s %s\n" % (self.address_string(), fmt % args))

        def _reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _forward(self) -> None:
            st = state.get()
            if self.path == "/proxy/status":
                return self._reply(200, {k: v for k, v in st.items()})
            up = st.get("upstream")
            if not up:
                return self._reply(503, {"error": "no model deployed behind this endpoint"})
            u = urlparse(up)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
            except OSError as e:
                conn.close()
                return self._reply(502, {"error": f"upstream {up} unreachable: {e.__class__.__name__}"})
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


def serve(state_path: Path, host: str, port: int, timeout: float = 600) -> None:
    srv = ThreadingHTTPServer((host, port), make_handler(_State(state_path), timeout))
    srv.daemon_threads = True
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
