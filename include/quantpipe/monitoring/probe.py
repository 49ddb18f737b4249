"""Quality probe: known prompts with expected answers, sent to the live stable endpoint.

Each prompt passes when its greedy (temperature 0) continuation contains one of its
expected answers (case-insensitive). The score is the share of prompts that pass;
it is pushed to the Pushgateway with latency and throughput, and the alert rule
``QuantpipeQualityBelowThreshold`` compares its rolling mean with the threshold.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from pydantic import BaseModel, Field

from ..errors import PipelineError
from . import metrics
from .settings import MonitorSettings

log = logging.getLogger(__name__)


class ProbeCase(BaseModel):
    prompt: str = Field(min_length=1)
    expect_any: list[str] = Field(min_length=1)


class ProbeOutcome(BaseModel):
    prompt: str
    answer: str
    passed: bool
    latency_s: float
    completion_tokens: int


class ProbeResult(BaseModel):
    deployment: str
    model: str
    score: float
    threshold: float
    regression: bool
    up: bool
    mean_latency_s: float
    tokens_per_s: float
    outcomes: list[ProbeOutcome]
    error: str = ""


def load_cases(path: Path) -> list[ProbeCase]:
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PipelineError(f"probe prompts {path}: {e}") from e
    if not isinstance(raw, list) or not raw:
        raise PipelineError(f"probe prompts {path} must be a non-empty JSON list of {{prompt, expect_any}}")
    try:
        return [ProbeCase.model_validate(c) for c in raw]
    except ValueError as e:
        raise PipelineError(f"probe prompts {path}: {e}") from e


def _complete(url: str, model: str, prompt: str, max_tokens: int, api_key: str | None,
              timeout: float) -> tuple[str, int]:
    from ..deployment.health import request_json

    out = request_json(f"{url}/v1/completions", {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                  "temperature": 0.0}, api_key, timeout)
    return out["choices"][0].get("text", ""), int((out.get("usage") or {}).get("completion_tokens") or 0)


def run_probe(deployment: str, model: str, s: MonitorSettings, api_key: str | None = None,
              cases: list[ProbeCase] | None = None) -> ProbeResult:
    """Probe the endpoint; an unreachable endpoint scores 0 (and ``up`` is False)."""
    cases = cases if cases is not None else load_cases(s.probe_file)
    outcomes, error = [], ""
    for c in cases:
        t0 = time.perf_counter()
        try:
            text, ntok = _complete(s.endpoint_url, model, c.prompt, s.probe_max_tokens, api_key, s.request_timeout_s)
        except PipelineError as e:
            error = str(e)
            log.warning("probe request failed: %s", e)
            outcomes.append(ProbeOutcome(prompt=c.prompt, answer="", passed=False, latency_s=0, completion_tokens=0))
            continue
        dt = time.perf_counter() - t0
        ok = any(e.lower() in text.lower() for e in c.expect_any)
        outcomes.append(ProbeOutcome(prompt=c.prompt, answer=text, passed=ok, latency_s=round(dt, 4),
                                     completion_tokens=ntok))
    answered = [o for o in outcomes if o.latency_s > 0]
    score = sum(o.passed for o in outcomes) / len(outcomes)
    total_t = sum(o.latency_s for o in answered)
    res = ProbeResult(deployment=deployment, model=model, score=round(score, 4), threshold=s.quality_threshold,
                      regression=score < s.quality_threshold, up=len(answered) == len(outcomes),
                      mean_latency_s=round(total_t / len(answered), 4) if answered else 0.0,
                      tokens_per_s=round(sum(o.completion_tokens for o in answered) / total_t, 2) if total_t else 0.0,
                      outcomes=outcomes, error=error)
    log.info("probe %s: score %.2f (threshold %.2f)%s, mean latency %.2f s, %.1f tokens/s", deployment, res.score,
             res.threshold, " REGRESSION" if res.regression else "", res.mean_latency_s, res.tokens_per_s)
    return res


def push_result(res: ProbeResult, s: MonitorSettings) -> None:
    reg = metrics.build_registry(res.deployment, res.model, score=res.score, threshold=res.threshold,
                                 latencies=[o.latency_s for o in res.outcomes if o.latency_s > 0],
                                 throughput=res.tokens_per_s, up=res.up)
    metrics.push(s.pushgateway_url, s.push_job, res.deployment, reg)


def probe_and_push(deployment: str, model: str | None = None, *, api_key: str | None = None,
                   settings: dict | None = None) -> dict:
    """DAG entry point: probe, push, return a small dict. The alert, not the task, reacts to a low score."""
    s = MonitorSettings.load(settings)
    res = run_probe(deployment, model or deployment, s, api_key)
    push_result(res, s)
    return {"deployment": deployment, "score": res.score, "threshold": res.threshold,
            "regression": res.regression, "up": res.up, "mean_latency_s": res.mean_latency_s,
            "tokens_per_s": res.tokens_per_s,
            "failed_prompts": [o.prompt for o in res.outcomes if not o.passed]}
