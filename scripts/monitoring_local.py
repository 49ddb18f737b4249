"""Prometheus, Alertmanager and Pushgateway for the embedded default, on 127.0.0.1.

    python scripts/monitoring_local.py start   # configured from docker/ (targets rewritten to local ports)
    python scripts/monitoring_local.py query 'vllm:generation_tokens_total'
    python scripts/monitoring_local.py stop

Ports: Prometheus 9090, Alertmanager 9093, Pushgateway 9091; vLLM's metrics are scraped
through the stable endpoint (QUANTPIPE_DEPLOY_ENDPOINT_PORT, default 8000). State in
.monitoring/ (gitignored); processes stopped by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from quantpipe.procs import pid_alive

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
HOME = Path(os.environ.get("QUANTPIPE_MONITORING_HOME", REPO / ".monitoring"))
PORTS = {"prometheus": 9090, "alertmanager": 9093, "pushgateway": 9091}
ENDPOINT_PORT = int(os.environ.get("QUANTPIPE_DEPLOY_ENDPOINT_PORT", "8000"))


def _bin(name: str) -> str:
    path = shutil.which(name)
    if not path:
        raise SystemExit(f"{name} is not installed: run scripts/setup_test_services.sh "
                         "(apt-get install prometheus prometheus-alertmanager prometheus-pushgateway)")
    return path


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _start(name: str, argv: list[str]) -> None:
    pidfile = HOME / f"{name}.pid"
    if pidfile.exists() and pid_alive(int(pidfile.read_text())):
        print(f"{name} already running (pid {pidfile.read_text()})")
        return
    log = open(HOME / f"{name}.log", "ab")
    p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    pidfile.write_text(str(p.pid))
    url = f"http://127.0.0.1:{PORTS[name]}/-/ready"
    for _ in range(60):
        if _ready(url):
            print(f"{name} ready on 127.0.0.1:{PORTS[name]} (pid {p.pid})")
            return
        if p.poll() is not None:
            raise SystemExit(f"{name} exited ({p.returncode}); see {HOME / (name + '.log')}")
        time.sleep(0.5)
    raise SystemExit(f"{name} not ready on {url}; see {HOME / (name + '.log')}")


def start() -> None:
    HOME.mkdir(parents=True, exist_ok=True)
    _start("pushgateway", [_bin("prometheus-pushgateway"), f"--web.listen-address=127.0.0.1:{PORTS['pushgateway']}",
                           f"--persistence.file={HOME / 'pushgateway.data'}"])
    am = yaml.safe_load((DOCKER / "alertmanager" / "alertmanager.yml").read_text())
    (HOME / "alertmanager.yml").write_text(yaml.safe_dump(am))
    _start("alertmanager", [_bin("prometheus-alertmanager"), f"--config.file={HOME / 'alertmanager.yml'}",
                            f"--storage.path={HOME / 'am'}", f"--web.listen-address=127.0.0.1:{PORTS['alertmanager']}",
                            "--cluster.listen-address="])
    cfg = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="5s", evaluation_interval="5s")
    cfg["rule_files"] = [str(DOCKER / "prometheus" / "alert_rules.yml")]
    cfg["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{PORTS['alertmanager']}"]
    targets = {"vllm": ENDPOINT_PORT, "pushgateway": PORTS["pushgateway"], "prometheus": PORTS["prometheus"]}
    for job in cfg["scrape_configs"]:
        job["static_configs"][0]["targets"] = [f"127.0.0.1:{targets[job['job_name']]}"]
    (HOME / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    _start("prometheus", [_bin("prometheus"), f"--config.file={HOME / 'prometheus.yml'}",
                          f"--storage.tsdb.path={HOME / 'tsdb'}",
                          f"--web.listen-address=127.0.0.1:{PORTS['prometheus']}"])


def query(expr: str) -> list:
    url = f"http://127.0.0.1:{PORTS['prometheus']}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())["data"]["result"]


def stop() -> None:
    for name in ("prometheus", "alertmanager", "pushgateway"):
        pidfile = HOME / f"{name}.pid"
        if pidfile.exists():
            pid = int(pidfile.read_text())
            if pid_alive(pid):
                os.killpg(pid, signal.SIGTERM)
                print(f"stopped {name} (pid {pid})")
            pidfile.unlink()


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "start":
        start()
    elif cmd == "stop":
        stop()
    elif cmd == "query":
        print(json.dumps(query(sys.argv[2]), indent=1))
    else:
        print(__doc__)
