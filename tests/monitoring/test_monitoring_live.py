"""Stage 6 against real servers: vLLM (CPU build) behind the stable endpoint, Pushgateway,
Prometheus (repo rules) and Alertmanager (repo config). Every Grafana panel query runs here."""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request

import pytest

from quantpipe.monitoring import probe, slo
from quantpipe.monitoring.settings import MonitorSettings

from .conftest import DOCKER

pytestmark = pytest.mark.slow


def settings(stack, **kw) -> MonitorSettings:
    return MonitorSettings.load({"pushgateway_url": stack["pushgateway"], "prometheus_url": stack["prometheus"],
                                 "endpoint_url": stack["endpoint"], "latency_window": "1m", **kw}, environ={})


def wait_for(fn, timeout=60, what=""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_probe_pushes_quality_and_prometheus_scrapes_it(stack):
    s = settings(stack)
    out = probe.probe_and_push(stack["model"], settings=s.model_dump(mode="json"))
    print("probe on BF16:", out)
    assert out["up"] and out["score"] >= s.quality_threshold and not out["regression"]
    res = wait_for(lambda: slo.query(s.prometheus_url, 'quantpipe_quality_score{deployment="smollm2"}'),
                   what="quality score in Prometheus")
    assert len(res) == 1 and float(res[0]["value"][1]) == out["score"], res
    assert res[0]["metric"]["job"] == "quantpipe_quality_probe"
    # vLLM's own metrics arrive through the stable endpoint
    wait_for(lambda: slo.query(s.prometheus_url, 'vllm:e2e_request_latency_seconds_count{model_name="smollm2"} > 0'),
             what="vLLM latency histogram in Prometheus")


def test_latency_slo_from_prometheus(stack):
    s = settings(stack)
    probe.run_probe(stack["model"], stack["model"], s)  # traffic for the rate window
    got = wait_for(lambda: (lambda r: r if r["p99_s"] else None)(slo.check_latency_slo(stack["model"], s)),
                   what="p99 from Prometheus")
    print("p99:", got)
    assert 0 < got["p99_s"] < s.latency_slo_s and not got["breached"]
    with pytest.raises(slo.SLOBreach, match="above the 0.001 s SLO"):
        slo.check_latency_slo(stack["model"], settings(stack, latency_slo_s=0.001))
    assert slo.check_latency_slo("no-such-model", s)["p99_s"] is None


def test_quality_regression_alert_fires(stack, tmp_path):
    """A probe whose expected answers the model does not give scores 0: the rolling-score alert
    fires in Prometheus and reaches Alertmanager's receiver."""
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([{"prompt": "The capital of France is", "expect_any": ["Madrid"]},
                                 {"prompt": "The capital of Japan is", "expect_any": ["Lima"]}]))
    s = settings(stack, probe_file=str(wrong))
    out = probe.probe_and_push(stack["model"], settings=s.model_dump(mode="json"))
    assert out["score"] == 0 and out["regression"]

    def firing():
        with urllib.request.urlopen(f"{stack['prometheus']}/api/v1/alerts") as r:
            alerts = json.loads(r.read())["data"]["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "QuantpipeQualityBelowThreshold"
                and a["state"] == "firing"]

    alert = wait_for(firing, 90, "QuantpipeQualityBelowThreshold firing")[0]
    assert alert["labels"]["deployment"] == "smollm2" and alert["labels"]["severity"] == "critical"

    def in_alertmanager():
        with urllib.request.urlopen(f"{stack['alertmanager']}/api/v2/alerts") as r:
            return [a for a in json.loads(r.read()) if a["labels"]["alertname"] == "QuantpipeQualityBelowThreshold"]

    wait_for(in_alertmanager, 60, "alert in Alertmanager")
    hook = stack["webhook"]
    wait_for(lambda: any(a["labels"]["alertname"] == "QuantpipeQualityBelowThreshold"
                         for n in hook.received for a in n["alerts"]), 60, "webhook notification")


def test_every_dashboard_panel_query_runs(stack):
    s = settings(stack)
    dash = json.loads((DOCKER / "grafana" / "dashboards" / "quantpipe-serving.json").read_text())
    exprs = [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]

    def all_have_data():
        empty = [(t, e) for t, e in exprs if not slo.query(s.prometheus_url, e)]
        return not empty or (setattr(all_have_data, "empty", empty) and False)

    try:
        wait_for(all_have_data, 60, "data for every panel")
    except AssertionError:
        pytest.fail(f"panels without data: {getattr(all_have_data, 'empty', None)}")
