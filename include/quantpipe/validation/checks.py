"""Stage 4a: compare the candidate with the baseline, check by check, each with its confidence.

Every check estimates one quantity with an interval (``stats``) and decides it as a
non-inferiority test: PASS, FAIL or INCONCLUSIVE. A measurement that is missing is
not skipped: its check is INCONCLUSIVE and names what is missing, and the gate
treats INCONCLUSIVE as not passed unless a person approves it.

The checks:

- ``perplexity``, ``next_token_accuracy``, ``kl_divergence``, ``top1_agreement``,
  ``confident_flips``: all held-out positions;
- ``kl:<slice>``, ``top1:<slice>``, ``flips:<slice>``, ``kl_excess:<slice>``,
  ``disagree_excess:<slice>`` for every domain, token class and the late-context slice (``slices``): damage
  confined to one capability, in absolute terms and as error concentrated in the slice;
- ``answers:<kind>``: the share of the short factual and numeric answers the baseline
  knows that the candidate changed;
- ``weights:untouched``: rows of the tensors the recipe keeps in full precision (embeddings, an
  ignored output head, the final norm) that differ from the baseline's (``untouched``);
- ``blocks:worst``: the worst decoder block's error, each block rebuilt with the baseline's
  tensors and run on the candidate's own input to it (``blocks``);
- ``files:tokenizer``, ``files:generation``, ``files:config``: what vLLM reads beside the
  weights, field by field against the baseline's (``companions``);
- ``task:<set>``: accuracy drop on the same items, for sets whose baseline is above
  chance (a set at chance cannot show damage; it is listed as excluded, not passed).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, computed_field

from ..settings import Tolerances
from .answers import answer_flips
from .metrics import consistency
from .slices import LATE_CONTEXT, Positions, slice_estimates, slice_masks
from .blocks import BlockErrors
from .stats import Z, Estimate, Verdict, decide, detectable, exact, paired_binary_drop, proportion
from .untouched import UntouchedResult

PER_SLICE = ("kl", "top1", "flips")


class Check(BaseModel):
    name: str
    description: str
    group: str
    unit: str = ""
    baseline: float | None = None
    quantized: float | None = None
    delta: float | None = None
    estimate: float | None = None
    low: float | None = None
    high: float | None = None
    limit: float
    kind: Literal["max", "min"]
    threshold: str
    verdict: Verdict
    detectable: float | None = None
    n: int = 0
    note: str = ""

    @computed_field
    @property
    def passed(self) -> bool:
        return self.verdict == "PASS"


def make_check(name: str, description: str, group: str, est: Estimate | None, limit: float,
               kind: Literal["max", "min"], unit: str = "", baseline: float | None = None,
               quantized: float | None = None, missing: str = "", scale: float = 1.0) -> Check:
    """A check from an estimate (None: not measured, INCONCLUSIVE with ``missing`` as the reason)."""
    verdict = decide(est, limit / scale, kind)
    det = detectable(est, limit / scale, kind)
    word = "<=" if kind == "max" else ">="
    note = "" if est is not None else f"not measured: {missing or 'no data'}"
    if est is not None and verdict == "INCONCLUSIVE":
        note = (f"interval [{est.low * scale:.4g}, {est.high * scale:.4g}] straddles the limit {limit:g}: "
                f"measure more ({est.n} positions/items, {est.units} independent units)")
    return Check(name=name, description=description, group=group, unit=unit, baseline=baseline, quantized=quantized,
                 delta=None if est is None else est.value * scale,
                 estimate=None if est is None else est.value * scale,
                 low=None if est is None else est.low * scale, high=None if est is None else est.high * scale,
                 limit=limit, kind=kind, threshold=f"{word} {limit:g}{unit}", verdict=verdict,
                 detectable=None if det is None else det * scale, n=0 if est is None else est.n, note=note)


def _limit(tol: Tolerances, name: str, default: float) -> float:
    return tol.check_limits.get(name, default)


def divergence_checks(pos: Positions | None, classes: dict[str, np.ndarray] | None, tol: Tolerances,
                      missing: str = "") -> list[Check]:
    """Overall and per-slice checks from the per-position arrays (None: all INCONCLUSIVE)."""
    out: list[Check] = []
    masks = slice_masks(pos, classes) if pos is not None and classes is not None else {}
    overall = slice_estimates(pos, masks["all"]) if masks else {}
    acc = _accuracy_drop(pos) if pos is not None else None
    base_ppl = float(np.exp(pos.nll_base.mean())) if pos is not None and len(pos.nll_base) else None
    cand_ppl = float(np.exp(pos.nll_cand.mean())) if pos is not None and len(pos.nll_cand) else None
    why = missing or "held-out positions of both models"
    out.append(make_check("perplexity", "held-out perplexity change, all domains (%)", "overall",
                          overall.get("ppl_pct"), tol.ppl_increase_pct, "max", " %", base_ppl, cand_ppl, why))
    out.append(make_check("next_token_accuracy", "held-out next-token accuracy drop (points)", "overall", acc,
                          tol.accuracy_drop_pct, "max", " points", missing=why, scale=100.0))
    out.append(make_check("kl_divergence", "mean KL(baseline || quantized) per held-out position (nats)",
                          "overall", overall.get("kl"), tol.max_mean_kl, "max", missing=why))
    out.append(make_check("top1_agreement", "held-out positions where the quantized top-1 equals the baseline's",
                          "overall", overall.get("top1"), tol.min_top1_agreement, "min", missing=why))
    out.append(make_check("confident_flips", f"baseline predictions with top-1 probability >= 0.5 that the "
                          "quantized model changes", "overall", overall.get("flips"), tol.max_flip_rate, "max",
                          missing=why))
    names = [n for n in masks if n != "all"] if masks else []
    for sl in names:
        est = slice_estimates(pos, masks[sl], ratio=tol.slice_ratio)
        kind, label = sl.split(":", 1)
        group = {"domain": "domain", "context": "context"}.get(kind, "token class")
        n_pos = int(masks[sl].sum())
        what = {"domain": f"{label} text", "context": f"positions with at least {LATE_CONTEXT} tokens of context"
                }.get(group, f"{label} tokens (read or predicted)") + f", {n_pos} positions"
        out.append(make_check(f"kl:{sl}", f"mean KL on {what}", group, est["kl"],
                              _limit(tol, f"kl:{sl}", tol.max_slice_kl), "max",
                              missing=f"fewer than 8 blocks of {sl} positions"))
        out.append(make_check(f"top1:{sl}", f"top-1 agreement on {what}", group, est["top1"],
                              _limit(tol, f"top1:{sl}", tol.min_slice_top1), "min",
                              missing=f"fewer than 8 blocks of {sl} positions"))
        out.append(make_check(f"flips:{sl}", f"confident predictions flipped on {what}", group, est["flips"],
                              _limit(tol, f"flips:{sl}", tol.max_flip_rate), "max",
                              missing=f"fewer than 8 blocks of confident {sl} positions"))
        out.append(make_check(f"kl_excess:{sl}", f"mean KL on {what} beyond {tol.slice_ratio:g}x the "
                              "other positions' (damage concentrated here)", group, est["kl_excess"],
                              _limit(tol, f"kl_excess:{sl}", tol.max_kl_excess), "max",
                              missing=f"fewer than 8 blocks of {sl} positions"))
        out.append(make_check(f"disagree_excess:{sl}", f"top-1 disagreement on {what} beyond "
                              f"{tol.slice_ratio:g}x the other positions'", group, est["disagree_excess"],
                              _limit(tol, f"disagree_excess:{sl}", tol.max_disagree_excess), "max",
                              missing=f"fewer than 8 blocks of {sl} positions"))
    return out


FILE_GROUPS = {
    "tokenizer": "tokenizer, special tokens and chat template the same as the baseline's",
    "generation": "generation defaults (end-of-sequence ids, sampling) the same as the baseline's",
    "config": "model config (architecture, rotary base, context length) the same as the baseline's",
}


def artifact_checks(untouched: UntouchedResult | None, files: dict[str, list[str]] | None,
                    missing: str = "") -> list[Check]:
    """Exact checks of what the recipe must not change: full-precision tensors and the files
    served beside the weights. Each counts differences against a limit of zero."""
    out = []
    if untouched is None:
        out.append(make_check("weights:untouched", "rows of full-precision tensors changed", "weights", None, 0.0,
                              "max", " rows", missing=missing or "the weights were not compared"))
    else:
        c = make_check("weights:untouched", f"rows changed in the {len(untouched.compared)} tensors the recipe keeps "
                       f"in full precision ({len(untouched.exempt)} quantized or smoothed tensors exempt)", "weights",
                       exact(untouched.changed_rows, untouched.rows), 0.0, "max", " rows")
        out.append(c.model_copy(update={"note": untouched.summary()}))
    for group, what in FILE_GROUPS.items():
        diffs = None if files is None else files.get(group)
        if diffs is None:
            out.append(make_check(f"files:{group}", what, "files", None, 0.0, "max", " differences",
                                  missing=missing or f"{group} files were not compared"))
            continue
        c = make_check(f"files:{group}", what, "files", exact(len(diffs), max(len(diffs), 1)), 0.0, "max",
                       " differences")
        out.append(c.model_copy(update={"note": "; ".join(diffs[:6]) + ("; ..." if len(diffs) > 6 else "")}))
    return out


def block_check(blocks: BlockErrors | None, limit: float, missing: str = "") -> Check:
    """The worst block's mean relative update error, its interval over runs of positions."""
    what = ("relative error of the worst decoder block's residual update, against the block rebuilt with the "
            "baseline's tensors on the same input")
    if blocks is None or not blocks.errors:
        return make_check("blocks:worst", what, "blocks", None, limit, "max", missing=missing or "not measured")
    i = int(np.argmax(blocks.errors))
    u = np.asarray(blocks.unit_means[i], dtype=np.float64)
    if len(u) < 2:
        return make_check("blocks:worst", what, "blocks", None, limit, "max",
                          missing=f"{blocks.positions} positions: too few to give an interval")
    value, se = blocks.errors[i], float(u.std(ddof=1) / np.sqrt(len(u)))
    est = Estimate(value, max(0.0, value - Z * se), value + Z * se, se, blocks.positions, len(u))
    c = make_check("blocks:worst", what, "blocks", est, limit, "max")
    worst = ", ".join(f"block {j}: {e:.3f}" for j, e in blocks.worst(4))
    return c.model_copy(update={"note": (c.note + "; " if c.note else "") + f"worst {worst}"})


def _accuracy_drop(pos: Positions) -> Estimate | None:
    from .slices import _per_block
    from .stats import block_ratio

    nb, allm = pos.blocks, np.ones(len(pos.target), dtype=bool)
    cb = (pos.top1_base == pos.target).astype(np.float64)
    cc = (pos.top1_cand == pos.target).astype(np.float64)
    count = np.bincount(pos.block, minlength=nb).astype(np.float64)
    return block_ratio(np.stack([_per_block(cb, allm, pos.block, nb), _per_block(cc, allm, pos.block, nb)]),
                       count, transform=lambda r: r[0] - r[1])


MIN_KNOWN = 10  # fewer known answers than this cannot decide an answer check


def _answer_limit(tol: Tolerances, kind: str) -> float:
    return _limit(tol, f"answers:{kind}", tol.max_number_flip_rate if kind == "number" else tol.max_answer_flip_rate)


def answer_checks(baseline: dict, quantized: dict, tol: Tolerances) -> tuple[list[Check], dict | None]:
    """Per kind of answer (facts, numbers): the share of the baseline's known answers lost."""
    b, q = baseline.get("answers"), quantized.get("answers")
    if not b or not q:
        who = "baseline" if not b else "quantized model"
        return [make_check(f"answers:{k}", f"{k} answers the baseline knows that changed", "answers", None,
                           _answer_limit(tol, k), "max", missing=f"answers of the {who}") for k in ("fact", "number")
                ], None
    flips = answer_flips(b, q)
    out = []
    for kind, k in flips["kinds"].items():
        est = proportion(k["lost"], k["known"]) if k["known"] >= MIN_KNOWN else None
        out.append(make_check(f"answers:{kind}", f"{kind} answers the baseline knows that changed ({k['lost']} "
                              f"of {k['known']} known, of {k['prompts']} prompts)", "answers", est,
                              _answer_limit(tol, kind), "max", missing=f"the baseline knows only {k['known']} {kind} answers (< {MIN_KNOWN})"))
    return out, flips


def task_allowance(tol: Tolerances, name: str) -> float:
    """The accuracy drop (points) tolerated on task set ``name``."""
    return tol.category_drop_pct.get(name, tol.task_drop_pct)


def task_checks(b_acc: dict | None, q_acc: dict | None, wanted: list[str], tol: Tolerances
                ) -> tuple[list[Check], list[dict]]:
    """Per task set, the accuracy drop on the same items. A set the baseline cannot show damage
    on (``uninformative``) is returned as excluded with the reason, never as a pass."""
    out, excluded = [], []
    b_tasks = (b_acc or {}).get("tasks", {})
    q_tasks = (q_acc or {}).get("tasks", {})
    for name in wanted:
        allowed = task_allowance(tol, name)
        b, q = b_tasks.get(name), q_tasks.get(name)
        if b is not None and (why := uninformative(b, allowed)):
            excluded.append({"name": f"task:{name}", "baseline": b["score"], "chance": b.get("chance", 0.0),
                             "n": b["n"], "reason": why})
            continue
        if b is None or q is None:
            who, acc = ("baseline", b_acc) if b is None else ("quantized model", q_acc)
            why = ((acc or {}).get("missing") or {}).get(name)
            out.append(make_check(f"task:{name}", f"accuracy drop on {name} (points)", "tasks", None, allowed,
                                  "max", " points", missing=f"no {name} results for the {who}"
                                  + (f": {why}" if why else ""), scale=100.0))
            continue
        est = paired_binary_drop(b["per_item"], q["per_item"])
        out.append(make_check(f"task:{name}", f"{b['category']}: {b['metric']} drop on {b['n']} items (points)",
                              "tasks", est, allowed, "max", " points", b["score"], q["score"],
                              missing="no items", scale=100.0))
    return out, excluded


def uninformative(b: dict, allowed_points: float) -> str:
    """Why a task set cannot show damage on this model ('' when it can): its baseline must be
    above chance with confidence, and above it by more than the tolerated drop (a set at
    0.10 with chance 0 could lose everything and stay within a 10-point tolerance)."""
    chance = float(b.get("chance", 0.0))
    base = proportion(round(b["score"] * b["n"]), b["n"])
    if base is None:
        return "no items"
    if base.low <= chance + 1e-9 or b["score"] - chance <= allowed_points / 100:
        return (f"the baseline ({b['score']:.3f} on {b['n']} items, lower bound {base.low:.3f}) is not above "
                f"chance ({chance:.3f}) by more than the tolerated drop ({allowed_points:g} points): this set "
                "cannot show damage on this model")
    return ""


def run_checks(baseline: dict, quantized: dict, tol: Tolerances, pos: Positions | None,
               classes: dict[str, np.ndarray] | None, tasks: list[str], missing: str = ""
               ) -> tuple[list[Check], dict]:
    """All checks, and the side information the report shows (greedy consistency, answer
    flips, excluded task sets)."""
    checks = divergence_checks(pos, classes, tol, missing)
    ans, flips = answer_checks(baseline, quantized, tol)
    checks.extend(ans)
    tchecks, excluded = task_checks(baseline.get("accuracy"), quantized.get("accuracy"), tasks, tol)
    checks.extend(tchecks)
    cons = consistency(baseline["generations"], quantized["generations"])
    cons["top1_agreement"] = next((c.estimate for c in checks if c.name == "top1_agreement"), None)
    return checks, {"consistency": cons, "answers": flips, "excluded": excluded}


def overall_verdict(checks: list[Check]) -> Verdict:
    if any(c.verdict == "FAIL" for c in checks):
        return "FAIL"
    if any(c.verdict == "INCONCLUSIVE" for c in checks):
        return "INCONCLUSIVE"
    return "PASS"
