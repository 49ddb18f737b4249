"""A stand-in for `vllm serve` in unit tests only (QUANTPIPE_VLLM_CMD points at it).

Reads MODEL/fake.json: {"answers": {prompt: [token ids]}, "exit_code": int|null, "die_on_completion": bool}.
"""

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def main() -> None:
    args = sys.argv[1:]
    assert args[0] == "serve", args
    model = Path(args[1])
    opt = {args[i]: args[i + 1] for i in range(2, len(args) - 1) if args[i].startswith("--")}
    spec = json.loads((model / "fake.json").read_text())
    print("fake vllm argv", json.dumps(args), "has_key", bool(os.environ.get("VLLM_API_KEY")), flush=True)
    if spec.get("exit_code") is not None:
        print("fake vllm: failing at startup as told", flush=True)
        sys.exit(spec["exit_code"])
    name, key = opt["--served-model-name"], os.environ.get("VLLM_API_KEY")

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def send(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def authorized(self):
            if key and self.headers.get("Authorization") != f"Bearer {key}":
                self.send(401, {"error": "Unauthorized"})
                return False
            return True

        def do_GET(self):
            if self.path == "/health":
                return self.send(200, {})
            if self.path == "/v1/models" and self.authorized():
                return self.send(200, {"data": [{"id": name, "root": str(model)}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if not self.authorized():
                return
            if spec.get("die_on_completion"):
                os._exit(3)
            ids = spec["answers"].get(body["prompt"], [9, 9, 9])[: body["max_tokens"]]
            self.send(200, {"choices": [{"text": " ".join(map(str, ids)),
                                         "logprobs": {"tokens": [f"token_id:{i}" for i in ids]}}],
                            "usage": {"completion_tokens": len(ids)}, "model": name})

    ThreadingHTTPServer((opt["--host"], int(opt["--port"])), H).serve_forever()


if __name__ == "__main__":
    main()
