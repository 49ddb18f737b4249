"""Real Prometheus, Alertmanager and Pushgateway (Debian packages) on 127.0.0.1, and a vLLM endpoint."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests.deployment.conftest import remove_private_scratch

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
SERVING_PY = REPO / ".venv-serving" / "bin" / "python"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binary(name: str) -> str:
    path = shutil.which(name)
    if not path:
        pytest.fail(f"{name} not installed: apt-get install -y prometheus prometheus-alertmanager "
                    "prometheus-pushgateway")
    return path


class Proc:
    """A process this test session started; stopped by its own PID."""

    def __init__(self, argv: list[str], log: Path, ready_url: str, timeout: float = 30):
        self.log = log
        self.out = open(log, "wb")
        self.p = subprocess.Popen(argv, stdout=self.out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            self._wait(argv, log, ready_url, timeout)
        except BaseException:
            self.stop()
            raise

    def _wait(self, argv, log, ready_url, timeout) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited: {log.read_text()[-2000:]}")
            try:
                if urllib.request.urlopen(ready_url, timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        else:
            raise RuntimeError(f"{argv[0]} not ready at {ready_url}: {log.read_text()[-2000:]}")
        # Another session may hold the port (free ports race): then ours exits on bind and the
        # ready answer came from the other server. Make sure ours is the one answering.
        time.sleep(1.0)
        if self.p.poll() is not None:
            raise RuntimeError(f"{argv[0]} exited after the port answered (taken by another process?): "
                               f"{log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.out.close()


class Webhook:
    """Receives Alertmanager notifications."""

    def __init__(self):
        self.received: list[dict] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                outer.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.srv.server_address[1]
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()


@pytest.fixture(scope="session")
def vllm_endpoint(tmp_path_factory, model_dir):
    """BF16 SmolLM2 on vLLM's CPU build behind the stable endpoint (module proxy), as deployed."""
    if not SERVING_PY.exists():
        pytest.skip(f"serving venv missing ({SERVING_PY}); create it with scripts/setup_serving_env.sh")
    from quantpipe.deployment import server as srv
    from quantpipe.deployment import switchover
    from quantpipe.deployment.settings import DeploySettings

    root = tmp_path_factory.mktemp("mon-vllm")
    port, endpoint = free_port(), free_port()
    s = DeploySettings.load({"state_dir": root, "endpoint_port": endpoint, "max_model_len": 1024,
                             "backend_ports": (port, port), "startup_timeout_s": 400}, environ={})
    h = srv.launch(s, model_dir, "smollm2", port=port, tag="monitoring")
    proxy = None
    try:
        srv.wait_healthy(h, s.startup_timeout_s)
        proxy = switchover.ensure_proxy(s)
        switchover.switch_endpoint(s, h, None)
        yield {"url": f"http://127.0.0.1:{endpoint}", "port": endpoint, "model": "smollm2", "handle": h}
    finally:
        srv.stop(h, 20)
        if proxy:
            srv.stop(proxy, 5)
        remove_private_scratch(root)


@pytest.fixture(scope="session")
def stack(tmp_path_factory, vllm_endpoint):
    """Pushgateway, Alertmanager and Prometheus configured from docker/ (addresses rewritten to free ports)."""
    root = tmp_path_factory.mktemp("prom")
    pg, am, prom = free_port(), free_port(), free_port()
    hook = Webhook()
    procs = []
    try:
        # Debian's build persists to /var/lib/prometheus/pushgateway.data by default: keep ours private
        procs.append(Proc([binary("prometheus-pushgateway"), f"--web.listen-address=127.0.0.1:{pg}",
                           f"--persistence.file={root / 'pushgateway.data'}"],
                          root / "pushgateway.log", f"http://127.0.0.1:{pg}/-/ready"))
        amcfg = yaml.safe_load((DOCKER / "alertmanager" / "alertmanager.yml").read_text())
        amcfg["receivers"][0]["webhook_configs"][0]["url"] = f"http://127.0.0.1:{hook.port}/alerts"
        amcfg["route"]["group_wait"] = "1s"
        (root / "alertmanager.yml").write_text(yaml.safe_dump(amcfg))
        procs.append(Proc([binary("prometheus-alertmanager"), f"--config.file={root / 'alertmanager.yml'}",
                           f"--storage.path={root / 'am'}", f"--web.listen-address=127.0.0.1:{am}",
                           "--cluster.listen-address="], root / "alertmanager.log", f"http://127.0.0.1:{am}/-/ready"))
        cfg = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
        cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
        cfg["rule_files"] = [str(DOCKER / "prometheus" / "alert_rules.yml")]
        cfg["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{am}"]
        targets = {"vllm": vllm_endpoint["port"], "pushgateway": pg, "prometheus": prom}
        assert {j["job_name"] for j in cfg["scrape_configs"]} == set(targets)
        for job in cfg["scrape_configs"]:
            job["static_configs"][0]["targets"] = [f"127.0.0.1:{targets[job['job_name']]}"]
        (root / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        procs.append(Proc([binary("prometheus"), f"--config.file={root / 'prometheus.yml'}",
                           f"--storage.tsdb.path={root / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom}"],
                          root / "prometheus.log", f"http://127.0.0.1:{prom}/-/ready"))
        with urllib.request.urlopen(f"http://127.0.0.1:{prom}/api/v1/status/flags") as r:
            assert json.loads(r.read())["data"]["config.file"] == str(root / "prometheus.yml"), \
                "another Prometheus answers on our port"
        yield {"pushgateway": f"http://127.0.0.1:{pg}", "alertmanager": f"http://127.0.0.1:{am}",
               "prometheus": f"http://127.0.0.1:{prom}", "webhook": hook, "endpoint": vllm_endpoint["url"],
               "model": vllm_endpoint["model"], "root": root}
    finally:
        for p in reversed(procs):
            p.stop()
        hook.srv.shutdown()
