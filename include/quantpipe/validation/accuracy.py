"""Task accuracy through lm-eval on the shipped local task sets, one score per category.

The already-loaded model is wrapped in lm-eval's HF backend, so each model is
loaded once per validation. lm-eval builds the requests (prompts, few-shot, BOS,
truncation, scoring); the forwards go through ``engine``: log-likelihoods in
length-sorted batches under a token budget, greedy generation batched with a static
KV cache (``BatchedHFLM``). Baseline and quantized run with identical settings:
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
from .engine import Placement, greedy, loglikelihoods, resolve_placement

log = logging.getLogger(__name__)
METRIC = {"mc": "acc,none", "gen": "exact_match,number"}


def batched_lm(model, tokenizer, placement: Placement, max_length: int = 1024):
    """lm-eval's HF backend with the engine's batched forwards (same requests, same scores)."""
    from lm_eval.models.huggingface import HFLM

    class BatchedHFLM(HFLM):
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            pairs = []
            for _, ctx, cont in requests:
                if not ctx or not cont:
                    raise ValueError("lm-eval request with an empty context or continuation")
                seq = (list(ctx) + list(cont))[-(self.max_length + 1):]  # HFLM's left truncation
                pairs.append((seq[:len(seq) - len(cont)], seq[len(seq) - len(cont):]))
            out = loglikelihoods(self.model, pairs, placement.token_budget)
            for (key, _, _), answer in zip(requests, out):
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            return out

        def _model_generate(self, context, max_length: int, stop: list[str], **kw):
            import torch

            mask = kw.pop("attention_mask", None)
            sampling = kw.get("do_sample") or float(kw.get("temperature") or 0.0) > 0
            if sampling or set(kw) - {"do_sample", "temperature"}:
                return super()._model_generate(context, max_length, stop, attention_mask=mask, **kw)
            rows = context.tolist() if mask is None else \
                [[t for t, m in zip(r, mr) if m] for r, mr in zip(context.tolist(), mask.tolist())]
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
            new = greedy(self.model, rows, max_length - context.shape[1], pad, cuda_graph=placement.cuda_graph,
                         stop_ids=[self.eot_token_id])
            width = max(len(n) for n in new)
            tail = torch.full((len(new), width), pad, dtype=torch.long)
            for r, n in enumerate(new):
                tail[r, :len(n)] = torch.tensor(n, dtype=torch.long)
            return torch.cat([context.cpu(), tail], 1)

    return BatchedHFLM(pretrained=model, tokenizer=tokenizer, batch_size=placement.gen_batch,
                       max_length=max_length, device=placement.device)


def task_accuracy(model, tokenizer, tasks_dir: Path, names: list[str], limit: int, seed: int = 1234,
                  placement: Placement | None = None) -> dict:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    unknown = sorted(set(names) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task sets {unknown}; known: {sorted(TASKS)}")
    t0 = time.perf_counter()
    lm = batched_lm(model, tokenizer, placement or resolve_placement())
    out = simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
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
