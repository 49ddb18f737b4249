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
            if self.path == "/tokenize":  # a fake tokenizer: two ids derived from the prompt
                return self.send(200, {"tokens": [len(body["prompt"]), 0]})
            if spec.get("die_on_completion"):
                os._exit(3)
            if isinstance(body["prompt"], list):  # echo + logprobs: the fake model's top-1 per position
                by_ids = {len(p): a for p, a in spec["answers"].items()}
                ans = by_ids.get(body["prompt"][0], [])
                n_cont = len(body["prompt"]) - 2
                tops = [None, {"token_id:0": -0.1}] + [{f"token_id:{ans[j] if j < len(ans) else 9}": -0.1}
                                                       for j in range(n_cont)]
                return self.send(200, {"choices": [{"text": "", "logprobs": {"top_logprobs": tops}}],
                                       "usage": {"completion_tokens": 1}, "model": name})
            ids = spec["answers"].get(body["prompt"], [9, 9, 9])[: body["max_tokens"]]
            self.send(200, {"choices": [{"text": " ".join(map(str, ids)),
                                         "logprobs": {"tokens": [f"token_id:{i}" for i in ids]}}],
                            "usage": {"completion_tokens": len(ids)}, "model": name})

    ThreadingHTTPServer((opt["--host"], int(opt["--port"])), H).serve_forever()


if __name__ == "__main__":
    main()
