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

from ..assets.tasks import CODE_TASKS, TASKS
from .engine.decoding import greedy
from .engine.packing import loglikelihoods
from .engine.placement import Placement, resolve_placement
from .user_tasks import task_names

log = logging.getLogger(__name__)


def _prefetch_encodings(lm, requests) -> dict[str, list[int]]:
    """Every string ``TemplateLM._encode_pair`` will encode for these log-likelihood requests,
    tokenized in a few batched calls (the fast tokenizer's batch path) instead of two
    ``encode`` calls per request. Same special-token rule as ``HFLM.tok_encode``."""
    from lm_eval.models.utils import _add_special_kwargs, has_bos_prefix

    strings = set()
    for req in requests:
        ctx, cont = req.args
        if not ctx:
            continue  # lm-eval encodes an empty context's continuation its own way
        n = len(ctx) - len(ctx.rstrip())
        if n:
            ctx, cont = ctx[:-n], ctx[-n:] + cont
        strings.update((ctx, ctx + cont))
    bos = lm.tokenizer.decode(lm.prefix_token_id)
    groups: dict[tuple, list[str]] = {}
    for text in strings:
        kw = _add_special_kwargs(None, lm.add_bos_token)
        if has_bos_prefix(text, bos):
            kw["add_special_tokens"] = False
        groups.setdefault(tuple(sorted(kw.items())), []).append(text)
    out: dict[str, list[int]] = {}
    for kw, texts in groups.items():
        out.update(zip(texts, lm.tokenizer(texts, **dict(kw))["input_ids"]))
    return out


def batched_lm(model, tokenizer, placement: Placement, max_length: int = 1024):
    """lm-eval's HF backend with the engine's batched forwards (same requests, same scores)."""
    return _batched_hflm_class()(pretrained=model, tokenizer=tokenizer, batch_size=placement.gen_batch,
                                 max_length=max_length, device=placement.device, placement=placement)


_CLASS: list = []


def _batched_hflm_class():
    """``BatchedHFLM``, defined once lm-eval is imported (it is an optional dependency)."""
    if _CLASS:
        return _CLASS[0]
    from lm_eval.models.huggingface import HFLM

    class BatchedHFLM(HFLM):
        def __init__(self, *args, placement: Placement, **kw):
            self.placement = placement
            self._encoded: dict[str, list[int]] = {}
            super().__init__(*args, **kw)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            self._encoded = _prefetch_encodings(self, requests)
            try:
                return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
            finally:
                self._encoded = {}

        def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None, **kw):
            hit = None if (add_special_tokens is not None or left_truncate_len or kw) else self._encoded.get(string)
            if hit is not None:
                return list(hit)
            return super().tok_encode(string, add_special_tokens=add_special_tokens,
                                      left_truncate_len=left_truncate_len, **kw)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            pairs = []
            for _, ctx, cont in requests:
                if not ctx or not cont:
                    raise ValueError("lm-eval request with an empty context or continuation")
                seq = (list(ctx) + list(cont))[-(self.max_length + 1):]  # HFLM's left truncation
                pairs.append((seq[:len(seq) - len(cont)], seq[len(seq) - len(cont):]))
            out = loglikelihoods(self.model, pairs, self.placement.token_budget, pack=self.placement.pack_width)
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
            new = greedy(self.model, rows, max_length - context.shape[1], pad, cuda_graph=self.placement.cuda_graph,
                         stop_ids=[self.eot_token_id], token_budget=self.placement.token_budget)
            width = max(len(n) for n in new)
            tail = torch.full((len(new), width), pad, dtype=torch.long)
            for r, n in enumerate(new):
                tail[r, :len(n)] = torch.tensor(n, dtype=torch.long)
            return torch.cat([context.cpu(), tail], 1)

    _CLASS.append(BatchedHFLM)
    return BatchedHFLM


class CodeEval:
    """What HumanEval needs beside the model: its problems and the sandbox's limits."""

    def __init__(self, problems, limits, max_new_tokens: int | None = None):
        self.problems, self.limits, self.max_new_tokens = problems, limits, max_new_tokens


def _scored(task, out: dict, name: str) -> tuple[str, str]:
    """(metric, filter) whose per-item values decide the set: the task's first metric under its
    first filter (lm-eval's own naming: ``results[name]["<metric>,<filter>"]``)."""
    metrics = task.config.metric_list or []
    if not metrics:
        raise ValueError(f"task {name} has no metric_list: nothing to compare")
    filters = task.config.filter_list or []
    filt = filters[0]["name"] if filters and isinstance(filters[0], dict) else "none"
    metric = metrics[0]["metric"] if isinstance(metrics[0], dict) else str(metrics[0])
    if f"{metric},{filt}" not in out["results"][name]:
        raise ValueError(f"task {name}: lm-eval reported no {metric!r} under filter {filt!r}")
    return metric, filt


def task_accuracy(model, tokenizer, tasks_dir: Path, names: list[str], limit: int, seed: int = 1234,
                  placement: Placement | None = None, user_dirs: tuple[Path, ...] = (),
                  code: CodeEval | None = None, chat_template: bool = False) -> dict:
    """Per task set: the score, its metric, the per-item values (in the sets' order) and chance.
    Built-in sets come from ``tasks_dir``, the user's from ``user_dirs`` (lm-eval YAMLs), and
    HumanEval runs its completions in the sandbox (``code``)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import random

    import numpy as np
    import torch
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager

    user = {n for d in user_dirs for n in task_names(d)}
    known = set(TASKS) | set(CODE_TASKS) | user
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"unknown task sets {unknown}; known: {sorted(known)}")
    t0 = time.perf_counter()
    lm = batched_lm(model, tokenizer, placement or resolve_placement())
    # what ``simple_evaluate`` does for a ready model, without its environment report
    # (``pip list`` and friends in subprocesses, ~0.5 s a call)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    scores: dict = {}
    missing: dict[str, str] = {}
    lm_eval_s = 0.0
    lm_names = [n for n in names if n not in CODE_TASKS]
    if lm_names:
        manager = TaskManager(include_path=[str(tasks_dir), *map(str, user_dirs)], include_defaults=False)
        loaded = manager.load(lm_names)
        for task in loaded["tasks"].values():
            task.set_fewshot_seed(seed=seed)
        t1 = time.perf_counter()
        out = evaluate(lm=lm, task_dict=loaded, limit=limit, log_samples=True, bootstrap_iters=0,
                       apply_chat_template=chat_template, fewshot_as_multiturn=chat_template)
        lm_eval_s = time.perf_counter() - t1
        for name in lm_names:
            task = loaded["tasks"][name]
            metric, filt = _scored(task, out, name)
            ordered = sorted((x for x in out["samples"][name] if x.get("filter", filt) == filt),
                             key=lambda x: x["doc_id"])
            per_item = [float(x[metric]) for x in ordered]
            mc = task.config.output_type == "multiple_choice"
            # chance: a uniform guess among each item's choices (0 for an exact answer)
            chance = sum(1 / max(len(x["arguments"]), 1) for x in ordered) / len(ordered) if mc and ordered else 0.0
            category = TASKS[name].category if name in TASKS else \
                str((task.config.metadata or {}).get("category") or f"yours: {name}")
            scores[name] = {"score": float(out["results"][name][f"{metric},{filt}"]), "metric": metric,
                            "n": len(per_item), "category": category, "chance": chance, "per_item": per_item}
    for name in (n for n in names if n in CODE_TASKS):
        if code is None:
            raise ValueError(f"{name} runs model-written code: it needs its problems and sandbox limits")
        from .humaneval import MAX_NEW_TOKENS, humaneval_scores

        from .sandbox import SandboxUnavailable

        try:
            scores[name] = humaneval_scores(lm, code.problems[:limit], code.limits, CODE_TASKS[name][0],
                                            code.max_new_tokens or MAX_NEW_TOKENS)
        except SandboxUnavailable as e:  # a missing measurement: its check cannot pass
            missing[name] = str(e)
            log.error("%s not measured: %s", name, e)
    secs = time.perf_counter() - t0
    log.info("task accuracy (%s items each) in %.1f s: %s", limit, secs,
             ", ".join(f"{k} {v['score']:.3f}" for k, v in scores.items()))
    return {"tasks": {n: scores[n] for n in names if n in scores}, "missing": missing, "seconds": round(secs, 2),
            "lm_eval_seconds": round(lm_eval_s, 2), "limit": limit, "seed": seed}

