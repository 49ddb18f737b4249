"""Stage 6 without servers: metrics, probe scoring (fake endpoint), settings, dashboard shape, rule files."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from quantpipe.errors import PipelineError
from quantpipe.monitoring import metrics, probe, slo
from quantpipe.monitoring.settings import MonitorSettings

from .conftest import DOCKER, free_port

DASHBOARD = DOCKER / "grafana" / "dashboards" / "quantpipe-serving.json"


def test_registry_holds_the_named_metrics():
    reg = metrics.build_registry("smollm2", "smollm2", score=0.5, threshold=0.75, latencies=[0.2, 0.4],
                                 throughput=12.5, up=True, now=1000.0)
    text = generate_latest(reg).decode()
    for line in ('quantpipe_quality_score{deployment="smollm2",model="smollm2"} 0.5',
                 'quantpipe_quality_threshold{deployment="smollm2",model="smollm2"} 0.75',
                 'quantpipe_quality_regression{deployment="smollm2",model="smollm2"} 1.0',
                 'quantpipe_inference_latency_seconds{deployment="smollm2",model="smollm2",stat="max"} 0.4',
                 'quantpipe_token_throughput_tokens_per_second{deployment="smollm2",model="smollm2"} 12.5',
                 'quantpipe_probe_up{deployment="smollm2",model="smollm2"} 1.0'):
        assert line in text


def _fake_endpoint(answer: str):
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            body = json.dumps({"choices": [{"text": answer}], "usage": {"completion_tokens": 4}}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_probe_scores_expected_answers():
    cases = [probe.ProbeCase(prompt="The capital of France is", expect_any=["Paris"]),
             probe.ProbeCase(prompt="The opposite of hot is", expect_any=["cold"])]
    srv = _fake_endpoint(" Paris, of course")
    try:
        s = MonitorSettings.load({"endpoint_url": f"http://127.0.0.1:{srv.server_address[1]}",
                                  "quality_threshold": 0.75}, environ={})
        r = probe.run_probe("smollm2", "smollm2", s, cases=cases)
    finally:
        srv.shutdown()
    assert r.score == 0.5 and r.regression and r.up and r.tokens_per_s > 0
    assert [o.passed for o in r.outcomes] == [True, False]


def test_probe_of_a_dead_endpoint_scores_zero_and_is_down():
    s = MonitorSettings.load({"endpoint_url": f"http://127.0.0.1:{free_port()}", "request_timeout_s": 2},
                             environ={})
    r = probe.run_probe("smollm2", "smollm2", s, cases=[probe.ProbeCase(prompt="x", expect_any=["y"])])
    assert r.score == 0 and not r.up and "failed" in r.error


def test_probe_file_and_settings_errors(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text('[{"prompt": "x"}]')
    with pytest.raises(PipelineError, match="expect_any"):
        probe.load_cases(bad)
    bad.write_text("{}")
    with pytest.raises(PipelineError, match="non-empty JSON list"):
        probe.load_cases(bad)
    assert len(probe.load_cases(MonitorSettings.load(environ={}).probe_file)) >= 4
    with pytest.raises(PipelineError, match="must be an http"):
        MonitorSettings.load({"prometheus_url": "localhost:9090"}, environ={})
    with pytest.raises(PipelineError, match="PromQL duration"):
        MonitorSettings.load({"latency_window": "5 minutes"}, environ={})
    assert MonitorSettings.load(environ={"QUANTPIPE_MONITOR_LATENCY_SLO_S": "2.5"}).latency_slo_s == 2.5


def test_p99_query_selects_the_model():
    q = slo.p99_query("smollm2", "5m")
    assert q == ('histogram_quantile(0.99, sum by (le) (rate(vllm:e2e_request_latency_seconds_bucket'
                 '{model_name="smollm2"}[5m])))')


def test_dashboard_is_provisionable():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["panels"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"] and "$" not in t["expr"], (p["title"], t["expr"])
    prov = (DOCKER / "grafana" / "provisioning" / "dashboards" / "quantpipe.yml").read_text()
    assert "/var/lib/grafana/dashboards" in prov
    compose = (DOCKER.parent / "docker-compose.yaml").read_text()
    assert "./docker/grafana/dashboards:/var/lib/grafana/dashboards" in compose
    prom = (DOCKER / "prometheus" / "prometheus.yml").read_text()
    assert "worker-serving:8000" in prom  # the serving worker publishes the stable endpoint


def test_promtool_rule_unit_tests():
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: apt-get install -y prometheus"
    out = subprocess.run([promtool, "check", "rules", str(DOCKER / "prometheus" / "alert_rules.yml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run([promtool, "test", "rules", "alert_rules_test.yml"], cwd=DOCKER / "prometheus",
                         capture_output=True, text=True)
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


def test_alertmanager_config_is_valid():
    amtool = shutil.which("amtool")
    assert amtool, "amtool missing: apt-get install -y prometheus-alertmanager"
    out = subprocess.run([amtool, "check-config", str(DOCKER / "alertmanager" / "alertmanager.yml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
