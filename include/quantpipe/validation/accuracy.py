"""Task accuracy through lm-eval on the shipped local task sets, one score per category.

The already-loaded model is wrapped in lm-eval's HF backend, so each model is
loaded once per validation. Baseline and quantized run with identical settings:
same items (the first ``limit`` of each set), zero-shot multiple choice scored by
log-likelihood (``acc``), 3-shot arithmetic scored by exact match on the first
number generated, same seeds, same BOS handling (lm-eval's default for the model).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from ..assets.tasks import TASKS

log = logging.getLogger(__name__)
METRIC = {"mc": "acc,none", "gen": "exact_match,number"}


def task_accuracy(model, tokenizer, tasks_dir: Path, names: list[str], limit: int, seed: int = 1234,
                  batch_size: int = 8) -> dict:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    unknown = sorted(set(names) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task sets {unknown}; known: {sorted(TASKS)}")
    t0 = time.perf_counter()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=1024, device="cpu")
    out = simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(include_path=str(tasks_dir)),
                          limit=limit, num_fewshot=0, random_seed=seed, numpy_random_seed=seed,
                          torch_random_seed=seed, fewshot_random_seed=seed, log_samples=True,
                          bootstrap_iters=0)
    scores = {}
    for name in names:
        kind, category = TASKS[name][1], TASKS[name][2]
        res = out["results"][name]
        samples = out["samples"][name]
        metric = METRIC[kind].split(",")[0]
        per_item = [float(s[metric]) for s in sorted(samples, key=lambda s: s["doc_id"])]
        scores[name] = {"score": float(res[METRIC[kind]]), "metric": metric, "n": len(per_item),
                        "category": category, "per_item": per_item}
    secs = time.perf_counter() - t0
    log.info("task accuracy (%s items each) in %.1f s: %s", limit, secs,
             ", ".join(f"{k} {v['score']:.3f}" for k, v in scores.items()))
    return {"tasks": scores, "seconds": round(secs, 2), "limit": limit, "seed": seed}
