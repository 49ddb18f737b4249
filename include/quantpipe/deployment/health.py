"""Health check: /health, /v1/models, then greedy completions compared with validation.

The validation report holds, per prompt, the greedy continuation the validated
model produced in transformers (plain prompt, default special tokens). vLLM is
asked for the same prompt at temperature 0 and its token ids are compared with
the validated ones. vLLM's CPU kernels round differently from transformers, so
an exact match of every token is not required: each prompt must reproduce its
first ``health_min_prefix_tokens`` tokens, and the mean share of tokens matched
before the first divergence must reach ``health_min_agreement``. A model that
loads a wrong config, or the wrong weights, answers garbage and fails both.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request

from pydantic import BaseModel

from ..errors import PipelineError
from .settings import DeploySettings

log = logging.getLogger(__name__)


class HealthError(PipelineError):
    """The server is up but not fit to take traffic."""


class PromptResult(BaseModel):
    prompt: str
    expected_text: str
    got_text: str
    expected_ids: list[int]
    got_ids: list[int]
    prefix_tokens: int
    agreement: float


class HealthResult(BaseModel):
    passed: bool
    agreement: float
    prompts: list[PromptResult]
    models: list[str]
    reason: str = ""


def request_json(url: str, body: dict | None = None, api_key: str | None = None, timeout: float = 120) -> dict:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                 headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        detail = e.read()[:300].decode(errors="replace")
        raise HealthError(f"{req.get_method()} {url} answered HTTP {e.code}: {detail}") from e
    except (urllib.error.URLError, OSError) as e:
        raise HealthError(f"{req.get_method()} {url} failed: {e}") from e


def greedy_completion(base_url: str, model: str, prompt: str, max_tokens: int, api_key: str | None = None,
                      timeout: float = 120) -> tuple[str, list[int]]:
    """Temperature-0 completion; returns (text, generated token ids)."""
    out = request_json(f"{base_url}/v1/completions", {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
        "logprobs": 0, "return_tokens_as_token_ids": True}, api_key, timeout)
    choice = out["choices"][0]
    toks = (choice.get("logprobs") or {}).get("tokens") or []
    ids = [int(t.split(":", 1)[1]) for t in toks if isinstance(t, str) and t.startswith("token_id:")]
    return choice.get("text", ""), ids


def prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def compare(expected_ids: list[int], got_ids: list[int]) -> tuple[int, float]:
    """(tokens matched before the first divergence, that count / expected length)."""
    if not expected_ids:
        return 0, 1.0 if not got_ids else 0.0
    n = prefix_len(expected_ids, got_ids)
    return n, n / len(expected_ids)


def check_health(base_url: str, served_name: str, generations: list[dict], s: DeploySettings,
                 api_key: str | None = None) -> HealthResult:
    """Raise HealthError when the server is down or answers unlike the validated model."""
    from .server import http_get

    try:
        status, body = http_get(f"{base_url}/health", timeout=10)
    except (OSError, urllib.error.URLError) as e:
        raise HealthError(f"{base_url}/health unreachable: {e}") from e
    if status != 200:
        raise HealthError(f"{base_url}/health answered HTTP {status}")
    models = [m["id"] for m in request_json(f"{base_url}/v1/models", api_key=api_key,
                                            timeout=s.request_timeout_s).get("data", [])]
    if served_name not in models:
        raise HealthError(f"{base_url}/v1/models lists {models}, not {served_name!r}")
    if not generations:
        raise HealthError("no validated generations to compare with")
    results = []
    t0 = time.perf_counter()
    for g in generations[: s.health_num_prompts]:
        exp = list(g["token_ids"])[: s.health_max_tokens]
        text, ids = greedy_completion(base_url, served_name, g["prompt"], max(len(exp), 1), api_key,
                                      s.request_timeout_s)
        if not ids and text:
            raise HealthError("the server returned no token ids (return_tokens_as_token_ids unsupported?)")
        n, agree = compare(exp, ids)
        results.append(PromptResult(prompt=g["prompt"], expected_text=g.get("text", ""), got_text=text,
                                    expected_ids=exp, got_ids=ids, prefix_tokens=n, agreement=agree))
    mean = sum(r.agreement for r in results) / len(results)
    need_prefix = [r for r in results if r.prefix_tokens < min(s.health_min_prefix_tokens, len(r.expected_ids))]
    reason = ""
    if mean < s.health_min_agreement:
        reason = f"mean greedy agreement {mean:.2f} < {s.health_min_agreement}"
    elif need_prefix:
        reason = (f"{len(need_prefix)} prompt(s) diverge within the first {s.health_min_prefix_tokens} tokens, "
                  f"e.g. {need_prefix[0].prompt!r} -> {need_prefix[0].got_text!r} "
                  f"(validated {need_prefix[0].expected_text!r})")
    res = HealthResult(passed=not reason, agreement=round(mean, 4), prompts=results, models=models, reason=reason)
    log.info("health %s: agreement %.2f over %d prompts in %.1f s%s", "PASSED" if res.passed else "FAILED",
             mean, len(results), time.perf_counter() - t0, f" ({reason})" if reason else "")
    return res


def require_healthy(base_url: str, served_name: str, generations: list[dict], s: DeploySettings,
                    api_key: str | None = None) -> HealthResult:
    res = check_health(base_url, served_name, generations, s, api_key)
    if not res.passed:
        worst = min(res.prompts, key=lambda r: r.agreement)
        raise HealthError(f"health check failed at {base_url}: {res.reason}; worst prompt {worst.prompt!r}: "
                          f"got {worst.got_text!r}, validated {worst.expected_text!r}")
    return res
