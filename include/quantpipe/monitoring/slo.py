"""Latency SLO: p99 of vLLM's end-to-end request latency, from Prometheus' HTTP API."""

from __future__ import annotations

import json
import logging
import math
import urllib.error
import urllib.parse
import urllib.request

from ..errors import PipelineError
from .settings import MonitorSettings

log = logging.getLogger(__name__)


class SLOBreach(PipelineError):
    """The served model's p99 latency is above the SLO."""


def p99_query(model: str | None, window: str) -> str:
    sel = f'{{model_name="{model}"}}' if model else ""
    return (f"histogram_quantile(0.99, sum by (le) "
            f"(rate(vllm:e2e_request_latency_seconds_bucket{sel}[{window}])))")


def query(prometheus_url: str, promql: str, timeout: float = 30) -> list[dict]:
    """Instant query; returns ``data.result`` or raises PipelineError naming the problem."""
    url = f"{prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            body = json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise PipelineError(f"Prometheus rejected {promql!r}: HTTP {e.code} {e.read()[:300]!r}") from e
    except (urllib.error.URLError, OSError) as e:
        raise PipelineError(f"Prometheus at {prometheus_url} unreachable: {e}") from e
    if body.get("status") != "success":
        raise PipelineError(f"Prometheus query {promql!r} failed: {body.get('error')}")
    return body["data"]["result"]


def check_latency_slo(model: str | None, s: MonitorSettings, *, fail: bool = True) -> dict:
    """p99 over ``latency_window``; raises SLOBreach above ``latency_slo_s`` when ``fail``."""
    promql = p99_query(model, s.latency_window)
    result = query(s.prometheus_url, promql, s.request_timeout_s)
    p99 = float(result[0]["value"][1]) if result else float("nan")
    if math.isnan(p99):
        log.info("no vLLM requests for %s in the last %s; nothing to compare", model, s.latency_window)
        return {"model": model, "p99_s": None, "slo_s": s.latency_slo_s, "breached": False, "query": promql}
    breached = p99 > s.latency_slo_s
    log.info("p99 latency of %s over %s: %.3f s (SLO %.3f s)%s", model, s.latency_window, p99, s.latency_slo_s,
             " BREACHED" if breached else "")
    out = {"model": model, "p99_s": round(p99, 4), "slo_s": s.latency_slo_s, "breached": breached, "query": promql}
    if breached and fail:
        raise SLOBreach(f"p99 latency of {model} is {p99:.3f} s over {s.latency_window}, above the "
                        f"{s.latency_slo_s} s SLO")
    return out
