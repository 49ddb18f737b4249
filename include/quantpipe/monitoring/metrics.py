"""The pipeline's own Prometheus metrics, pushed to a Pushgateway.

vLLM exports serving metrics itself on ``/metrics`` (``vllm:e2e_request_latency_seconds``,
``vllm:time_to_first_token_seconds``, ``vllm:generation_tokens_total``, ...), which
Prometheus scrapes through the stable endpoint. These are what vLLM cannot know:

- ``quantpipe_quality_score``            share of probe prompts answered as expected (0-1)
- ``quantpipe_quality_threshold``        the threshold the alert compares the rolling score with
- ``quantpipe_quality_regression``       1 when this probe's score is below the threshold
- ``quantpipe_inference_latency_seconds`` probe request latency (stat = mean | max)
- ``quantpipe_token_throughput_tokens_per_second`` generated tokens / request time over the probe
- ``quantpipe_probe_up``                 1 when the endpoint answered every probe request
- ``quantpipe_probe_last_run_timestamp_seconds``
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

from ..errors import PipelineError

log = logging.getLogger(__name__)
LABELS = ("deployment", "model")


def build_registry(deployment: str, model: str, *, score: float, threshold: float, latencies: list[float],
                   throughput: float, up: bool, now: float | None = None) -> CollectorRegistry:
    reg = CollectorRegistry()
    lab = {"deployment": deployment, "model": model}

    def gauge(name: str, doc: str, value: float) -> None:
        Gauge(name, doc, LABELS, registry=reg).labels(**lab).set(value)

    gauge("quantpipe_quality_score", "Share of probe prompts answered as expected (0-1)", score)
    gauge("quantpipe_quality_threshold", "Rolling quality score below which the alert fires", threshold)
    gauge("quantpipe_quality_regression", "1 when the probe score is below the threshold", float(score < threshold))
    lat = Gauge("quantpipe_inference_latency_seconds", "Probe request latency", [*LABELS, "stat"], registry=reg)
    if latencies:
        lat.labels(**lab, stat="mean").set(sum(latencies) / len(latencies))
        lat.labels(**lab, stat="max").set(max(latencies))
    gauge("quantpipe_token_throughput_tokens_per_second", "Generated tokens per second of request time", throughput)
    gauge("quantpipe_probe_up", "1 when the endpoint answered every probe request", float(up))
    gauge("quantpipe_probe_last_run_timestamp_seconds", "Unix time of the last probe", now or time.time())
    return reg


def push(gateway_url: str, job: str, deployment: str, registry: CollectorRegistry, timeout: float = 10) -> None:
    """Replace this deployment's group on the Pushgateway (PUT)."""
    try:
        push_to_gateway(gateway_url, job=job, registry=registry, grouping_key={"deployment": deployment}, timeout=timeout)
    except OSError as e:
        raise PipelineError(f"could not push metrics to the Pushgateway at {gateway_url}: {e}") from e
    log.info("pushed %s metrics for %s to %s", job, deployment, gateway_url)
