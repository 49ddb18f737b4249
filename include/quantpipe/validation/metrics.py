"""Model measurements shared by the baseline (stage 1) and validation (stage 4).

Both models are measured with identical settings: same held-out tokens, same
windows, same prompts, greedy decoding. Perplexity runs over non-overlapping
windows of the held-out corpus; generation records token ids so divergence can
be located exactly.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..settings import EvalSettings
from .engine.attention import attention_kernels
from .engine.decoding import greedy
from .engine.packing import loglikelihoods, window_batches
from .engine.placement import Placement, device_of, parts, resolve_placement
from .engine.streams import overlapped

if TYPE_CHECKING:
    from .suite import TaskSuite

log = logging.getLogger(__name__)
PROMPTS_FILE = Path(__file__).with_name("prompts.json")


def load_prompts(n: int) -> list[str]:
    prompts = json.loads(PROMPTS_FILE.read_text())
    return prompts[:n]


def load_model(path: Path, placement: Placement | None = None):
    """Load a checkpoint (plain or compressed-tensors) where this worker evaluates: the GPU
    in bfloat16, or the CPU in float32 (see ``engine.resolve_placement``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .sharding import load_kwargs, placed

    placement = placed(path, placement or resolve_placement())
    if placement.device == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    kwargs = {}
    if "quantization_config" in json.loads((path / "config.json").read_text()):
        from transformers import CompressedTensorsConfig

        # dense (decompressed) weights: inspectable per layer, and faster on CPU than
        # dequantizing on every forward; activation quantization (FP8/W8A8) still applies
        kwargs["quantization_config"] = CompressedTensorsConfig(run_compressed=False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=placement.torch_dtype, trust_remote_code=False,
                                                 use_safetensors=True, **load_kwargs(path, placement), **kwargs)
    model.eval()
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    return model, tok


def heldout_token_ids(tokenizer, texts: list[str], max_tokens: int) -> list[int]:
    ids: list[int] = []
    sep = tokenizer.eos_token_id
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if sep is not None:
            ids.append(sep)
        if len(ids) >= max_tokens:
            break
    return ids[:max_tokens]


MIN_WINDOW = 16  # a domain's last window shorter than this is dropped


def heldout_segments(tokenizer, domains: dict[str, list[dict]], per_domain: int,
                     window: int) -> tuple[list[int], list[tuple[int, int, str]], dict[str, str]]:
    """The held-out token stream, domain after domain, each up to ``per_domain`` tokens and
    cut into windows that never cross a domain: (ids, windows as (start, length, domain),
    domains skipped with the reason). Chat rows (``messages``) are rendered with the
    model's own chat template; documents are separated by EOS, as in ``heldout_token_ids``."""
    ids: list[int] = []
    windows: list[tuple[int, int, str]] = []
    skipped: dict[str, str] = {}
    sep = tokenizer.eos_token_id
    for name, rows in domains.items():
        seg: list[int] = []
        for r in rows:
            if "messages" in r:
                if not getattr(tokenizer, "chat_template", None):
                    skipped[name] = "the tokenizer has no chat template"
                    break
                text = tokenizer.apply_chat_template(r["messages"], tokenize=False)
            else:
                text = r["text"]
            seg.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            if sep is not None:
                seg.append(sep)
            if len(seg) >= per_domain:
                break
        seg = seg[:per_domain]
        if name in skipped:
            continue
        start, used = len(ids), 0
        for i in range(0, len(seg), window):
            n = min(window, len(seg) - i)
            if n < MIN_WINDOW:
                break
            windows.append((start + i, n, name))
            used = i + n
        if not used:
            skipped[name] = f"only {len(seg)} tokens of text"
        ids.extend(seg[:used])
    return ids, windows, skipped


TOPK = 32


def perplexity(model, token_ids: list[int], window: int, reference: dict | None = None, batch: int = 1,
               lengths: list[int] | None = None) -> dict:
    """Mean next-token NLL over non-overlapping windows -> perplexity, plus at every position
    the model's top-1 prediction and its top-``TOPK`` log-probabilities (``dist``, for use
    as the reference of another model). With ``reference`` (a baseline's ``dist``) it also
    returns the KL divergence KL(baseline || model) per position, computed over the
    baseline's top-k tokens plus one bucket for the rest of the vocabulary (a lower bound
    of the full KL, tight when the baseline's mass sits in its top-k). ``batch`` windows
    of equal length go through the model together. ``lengths``: the windows' lengths in
    order (contiguous in ``token_ids``; default: ``window`` each). ``per_position`` holds
    each position's NLL, top-1 and (with ``reference``) KL, for the slice checks."""
    import torch

    t0 = time.perf_counter()
    dev = device_of(model)
    body, head = parts(model)
    if lengths is None:
        lengths = [min(window, len(token_ids) - i) for i in range(0, len(token_ids), window)]
        if lengths and lengths[-1] < 2:  # a lone last token predicts nothing
            lengths.pop()
            token_ids = token_ids[:sum(lengths)]
    if sum(lengths) != len(token_ids) or min(lengths, default=2) < 2:
        raise ValueError(f"window lengths {lengths[:4]}... do not tile {len(token_ids)} held-out tokens")
    starts = [0, *itertools.accumulate(lengths)][:-1]
    windows = [token_ids[s0:s0 + n] for s0, n in zip(starts, lengths)]
    nll = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.long, device=dev)
    top1, topk_ids, topk_logp, kls, nlls = [], [], [], [], []
    pos = off = 0
    # everything stays on the device until the end: no host sync between windows
    all_ids = torch.tensor(token_ids, dtype=torch.long).to(dev)
    if reference is not None:
        ref_ids, ref_lp = reference["topk_ids"].to(dev), reference["topk_logp"].to(dev)
    with torch.inference_mode():
        for group in window_batches(windows, batch):
            k, w = len(group), len(group[0])
            x = all_ids[off:off + k * w].view(k, w)  # consecutive windows of equal length
            off += k * w
            hidden = body(input_ids=x).last_hidden_state
            for r in range(x.shape[0]):
                raw = head(hidden[r, :-1])  # the model's dtype: ranking on it reads half the bytes
                logits = raw.float()
                lse = torch.logsumexp(logits, -1)  # log p = logit - lse (a log_softmax without its copy)
                tgt = x[r, 1:]
                pos_nll = lse - logits.gather(1, tgt[:, None])[:, 0]
                nlls.append(pos_nll)
                nll += pos_nll.sum(dtype=torch.float64)
                pred = raw.argmax(-1)
                correct += (pred == tgt).sum()
                top1.append(pred)
                v, i = raw.topk(TOPK, -1)
                topk_ids.append(i.to(torch.int32))
                topk_logp.append(v.float() - lse[:, None])
                n = logits.shape[0]
                if reference is not None:
                    r_ids = ref_ids[pos:pos + n].long()
                    r_lp = ref_lp[pos:pos + n].float()
                    p_k = r_lp.exp()
                    q_k = (logits.gather(1, r_ids) - lse[:, None]).exp()
                    p_rest = (1 - p_k.sum(1)).clamp_min(1e-12)
                    q_rest = (1 - q_k.sum(1)).clamp_min(1e-12)
                    kl = (p_k * (r_lp - q_k.clamp_min(1e-30).log())).sum(1) + p_rest * (p_rest.log() - q_rest.log())
                    kls.append(kl.clamp_min(0))
                pos += n
    count = pos
    nll, correct = float(nll), int(correct)
    top1 = torch.cat(top1).tolist()
    topk_ids, topk_logp = [t.cpu() for t in topk_ids], [t.cpu() for t in topk_logp]
    kls = [k.cpu() for k in kls]
    per_position = {"nll": torch.cat(nlls).float().cpu(), "top1": torch.tensor(top1, dtype=torch.int32)}
    secs = time.perf_counter() - t0
    ppl = math.exp(nll / count)
    log.info("perplexity %.3f over %d tokens (%d windows, %d per forward) in %.1f s (%.0f tokens/s)",
             ppl, count, len(windows), batch, secs, count / secs)
    out = {"perplexity": ppl, "nll": nll / count, "tokens": count, "seconds": round(secs, 2),
           "next_token_accuracy": correct / count, "top1": top1,
           "dist": {"topk_ids": torch.cat(topk_ids), "topk_logp": torch.cat(topk_logp).half()},
           "per_position": per_position}
    if kls:
        kl = torch.cat(kls)
        per_position["kl"] = kl.float()
        out["kl"] = {"mean": float(kl.mean()), "p95": float(kl.quantile(0.95)), "max": float(kl.max()),
                     "histogram": _histogram(kl)}
    return out


def _histogram(values, bins: int = 20) -> dict:
    import torch

    top = max(float(values.max()), 1e-6)
    counts = torch.histc(values, bins=bins, min=0.0, max=top)
    return {"edges": [round(top * i / bins, 6) for i in range(bins + 1)], "counts": [int(c) for c in counts]}


def top1_agreement(baseline_top1: list[int], candidate_top1: list[int]) -> float:
    """Share of held-out positions where both models predict the same next token."""
    if len(baseline_top1) != len(candidate_top1) or not baseline_top1:
        raise ValueError(f"top-1 predictions differ in length: {len(baseline_top1)} vs {len(candidate_top1)}")
    return sum(a == b for a, b in zip(baseline_top1, candidate_top1)) / len(baseline_top1)


def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int,
                    placement: Placement | None = None) -> list[dict]:
    """Greedy continuations of the prompts, decoded together (``engine.greedy``); each stops
    after its first EOS, as ``generate`` would."""
    placement = placement or resolve_placement()
    t0 = time.perf_counter()
    enc = [tokenizer(p)["input_ids"] for p in prompts]
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    new_ids: list[list[int]] = []
    for i in range(0, len(enc), placement.gen_batch):
        new_ids += greedy(model, enc[i:i + placement.gen_batch], max_new_tokens, pad,
                          cuda_graph=placement.cuda_graph, stop_ids=[eos] if eos is not None else [],
                          token_budget=placement.token_budget)
    out = [{"prompt": p, "token_ids": ids, "text": tokenizer.decode(ids, skip_special_tokens=True)}
           for p, ids in zip(prompts, new_ids)]
    log.info("greedy generation: %d prompts x %d tokens in %.1f s", len(prompts), max_new_tokens,
             time.perf_counter() - t0)
    return out


def _answer_head(tokenizer, ids: list[int]) -> list[int]:
    """The generated tokens up to and including the first that holds a letter or digit (a
    leading space is often a token of its own: its probability says nothing of the answer)."""
    for i, t in enumerate(ids):
        if any(ch.isalnum() for ch in tokenizer.decode([t])):
            return ids[:i + 1]
    return []


Heldout = "dict[str, list[dict]] | list[str]"


def few_shot_prefix(prompt: str) -> str:
    """The examples before a prompt's own question: everything before its last line, or before
    its last two when it ends in an answer cue on a line of its own ("Q: ...\nA:")."""
    head, _, last = prompt.rpartition("\n")
    if head and len(last.strip()) <= 3 and last.strip().endswith(":"):
        head = head.rpartition("\n")[0]
    return head


def as_domains(heldout) -> dict[str, list[dict]]:
    """Held-out text as domain -> rows; a plain list of texts is the ``prose`` domain."""
    if isinstance(heldout, dict):
        return heldout
    return {"prose": [{"text": t} for t in heldout]}


def measure(path: Path, heldout: Heldout, s: EvalSettings, tasks: TaskSuite | None = None,
            reference: dict | None = None, placement: Placement | None = None) -> dict:
    """Everything validation compares: perplexity (+KL against ``reference``) per held-out
    domain, greedy outputs, answers to the answer-flip prompts and task accuracy. One model
    load. ``dist`` (tensors) is returned for the caller to store."""
    from .sharding import placed

    placement = placed(path, placement or resolve_placement())
    t0 = time.perf_counter()
    model, tok = load_model(path, placement)
    out = measure_loaded(model, tok, heldout, s, tasks, reference, placement)
    out["load_seconds"] = round(time.perf_counter() - t0 - out["measure_seconds"], 2)
    return out


def measure_loaded(model, tok, heldout: Heldout, s: EvalSettings, tasks: TaskSuite | None,
                   reference: dict | None, placement: Placement, before_tasks=None) -> dict:
    """``measure`` on a model already in memory (the GPU benchmark builds one there). On a
    GPU, task accuracy runs beside perplexity and greedy generation (``engine.overlapped``);
    the figures are those of running them one after another.

    ``before_tasks(partial) -> str``: where the task sets run after the rest (one device
    stream), it is called with everything else measured; a reason it returns leaves the
    sets unmeasured (``accuracy`` then names the reason for each set)."""
    from .answers import answer_prompts

    t0 = time.perf_counter()
    want_tasks = tasks is not None and tasks.limit > 0 and bool(tasks.names)
    asks = answer_prompts() + list(tasks.answers if tasks else ())
    consistency_prompts = load_prompts(s.num_prompts)
    if s.chat_template and getattr(tok, "chat_template", None):  # as the model is prompted in production
        consistency_prompts = [tok.apply_chat_template([{"role": "user", "content": x}], tokenize=False,
                                                       add_generation_prompt=True) for x in consistency_prompts]

    def generations():
        gens = greedy_generate(model, tok, consistency_prompts, s.max_new_tokens, placement)
        # one batch per few-shot prefix: the engine computes a batch's shared prefix once
        groups: dict[str, list[int]] = {}
        for i, a in enumerate(asks):
            groups.setdefault(few_shot_prefix(a["prompt"]), []).append(i)
        answers: list = [None] * len(asks)
        for idx in groups.values():
            for i, g in zip(idx, greedy_generate(model, tok, [asks[i]["prompt"] for i in idx], s.answer_tokens,
                                                 placement)):
                answers[i] = g
        rows = [{**a, "text": g["text"]} for a, g in zip(asks, answers)]
        if reference is None:  # the baseline: how sure it is of each answer's first word or number
            head = [_answer_head(tok, g["token_ids"]) for g in answers]
            pairs = [(tok(a["prompt"])["input_ids"], h) for a, h in zip(asks, head) if h]
            lls = iter(loglikelihoods(model, pairs, placement.token_budget, pack=placement.pack_width))
            for r, h in zip(rows, head):
                r["p_first"] = round(math.exp(next(lls)[0]), 4) if h else 0.0
        return gens, rows

    def task_sets():
        if not want_tasks:
            return None
        from .accuracy import task_accuracy

        return task_accuracy(model, tok, tasks.folders[0], list(tasks.names), tasks.limit, placement=placement,
                             user_dirs=tasks.folders[1:], code=tasks.code, chat_template=tasks.chat_template)

    def held_out():
        ids, windows, skipped = heldout_segments(tok, as_domains(heldout), s.ppl_max_tokens, s.ppl_window)
        if not windows:
            raise ValueError("no held-out text to measure: every domain was skipped " + json.dumps(skipped))
        ppl = perplexity(model, ids, s.ppl_window, reference, batch=placement.ppl_batch,
                         lengths=[n for _, n, _ in windows])
        info = {"windows": [[n, d] for _, n, d in windows], "skipped": skipped, "tokens": len(ids),
                "sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest()}
        return ppl, ids, windows, info

    with attention_kernels(placement):
        if placement.overlap and placement.device == "cuda":
            # perplexity's large GEMMs here; greedy decoding (latency-bound) and lm-eval
            # (partly CPU-bound) each on its own stream beside it
            # (decode steps on a high-priority stream: they slip in between the GEMMs' blocks)
            (ppl, ids, windows, info), (gens, answers), acc = overlapped(held_out, generations, task_sets,
                                                                         priorities=(-1, 0))
        else:
            (ppl, ids, windows, info), (gens, answers), acc = held_out(), generations(), "later"
    dist = ppl.pop("dist")
    per_position = ppl.pop("per_position")
    dist.update({"nll": per_position["nll"], "top1": per_position["top1"]})
    out = {"perplexity": ppl, "generations": gens, "answers": answers, "settings": s.model_dump(mode="json"),
           "engine": placement.kind, "heldout": info, "dist": dist, "per_position": per_position,
           "heldout_ids": ids, "windows": windows}
    if acc == "later":
        why = before_tasks(out) if (before_tasks is not None and want_tasks) else ""
        if why:
            log.info("task sets not measured: %s", why)
            acc = {"tasks": {}, "missing": {n: why for n in tasks.names}, "skipped": why}
        else:
            with attention_kernels(placement):
                acc = task_sets()
    if acc is not None:
        out["accuracy"] = acc
    out["measure_seconds"] = round(time.perf_counter() - t0, 2)
    return out


def consistency(baseline: list[dict], candidate: list[dict]) -> dict:
    """Greedy agreement: exact-match rate, token agreement up to first divergence, where it diverges."""
    if len(baseline) != len(candidate):
        raise ValueError(f"{len(baseline)} baseline generations vs {len(candidate)} candidate generations")
    per_prompt = []
    agree, total, exact = 0, 0, 0
    for b, c in zip(baseline, candidate):
        if b["prompt"] != c["prompt"]:
            raise ValueError(f"prompt mismatch: {b['prompt']!r} vs {c['prompt']!r}")
        bt, ct = b["token_ids"], c["token_ids"]
        first = next((i for i, (x, y) in enumerate(zip(bt, ct)) if x != y), min(len(bt), len(ct)))
        same = bt == ct
        exact += same
        agree += first
        total += len(bt)
        per_prompt.append({"prompt": b["prompt"], "exact": same, "first_divergence": None if same else first,
                           "baseline": b["text"], "quantized": c["text"]})
    return {"exact_match_rate": exact / len(baseline), "token_agreement": agree / max(total, 1),
            "per_prompt": per_prompt}
