"""Stage 4a: compare quantized against baseline measurements, check by check."""

from __future__ import annotations

import math

from pydantic import BaseModel

from ..settings import Tolerances
from .metrics import consistency, top1_agreement


class Check(BaseModel):
    name: str
    description: str
    baseline: float
    quantized: float
    delta: float
    threshold: str
    passed: bool


def run_checks(baseline: dict, quantized: dict, tol: Tolerances) -> tuple[list[Check], dict]:
    """Perplexity, next-token accuracy, top-1 agreement and greedy consistency vs. the baseline."""
    bp, qp = baseline["perplexity"], quantized["perplexity"]
    delta_pct = (qp["perplexity"] - bp["perplexity"]) / bp["perplexity"] * 100
    acc_drop = (bp["next_token_accuracy"] - qp["next_token_accuracy"]) * 100
    agree = top1_agreement(bp["top1"], qp["top1"])
    cons = consistency(baseline["generations"], quantized["generations"])
    cons["top1_agreement"] = agree
    checks = [
        Check(name="perplexity", description="held-out perplexity (delta in %)", baseline=bp["perplexity"],
              quantized=qp["perplexity"], delta=delta_pct, threshold=f"delta <= +{tol.ppl_increase_pct:g} %",
              passed=delta_pct <= tol.ppl_increase_pct),
        Check(name="next_token_accuracy", description="held-out next-token accuracy (delta in points)",
              baseline=bp["next_token_accuracy"], quantized=qp["next_token_accuracy"], delta=-acc_drop,
              threshold=f"drop <= {tol.accuracy_drop_pct:g} points", passed=acc_drop <= tol.accuracy_drop_pct),
        Check(name="top1_agreement", description="held-out positions with the baseline's top-1 prediction",
              baseline=1.0, quantized=agree, delta=agree - 1.0, threshold=f">= {tol.min_top1_agreement:g}",
              passed=agree >= tol.min_top1_agreement),
        Check(name="greedy_consistency",
              description="baseline greedy tokens reproduced before the first divergence",
              baseline=1.0, quantized=cons["token_agreement"], delta=cons["token_agreement"] - 1.0,
              threshold=f">= {tol.min_token_agreement:g}", passed=cons["token_agreement"] >= tol.min_token_agreement),
    ]
    if "kl" in qp:
        checks.append(Check(name="kl_divergence", description="mean KL(baseline || quantized) per held-out token "
                            "(nats)", baseline=0.0, quantized=qp["kl"]["mean"], delta=qp["kl"]["mean"],
                            threshold=f"<= {tol.max_mean_kl:g}", passed=qp["kl"]["mean"] <= tol.max_mean_kl))
    checks.extend(category_checks(baseline.get("accuracy"), quantized.get("accuracy"), tol))
    return checks, cons


def paired_drop(b_items: list[float], q_items: list[float]) -> tuple[float, float]:
    """Mean drop (points) over the same items and its standard error."""
    if len(b_items) != len(q_items) or not b_items:
        raise ValueError(f"task items differ: {len(b_items)} baseline vs {len(q_items)} quantized")
    d = [(b - q) * 100 for b, q in zip(b_items, q_items)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / max(n - 1, 1)
    return mean, math.sqrt(var / n)


def category_checks(b_acc: dict | None, q_acc: dict | None, tol: Tolerances) -> list[Check]:
    """Per task set (category): the accuracy drop must stay within its tolerance plus one
    paired standard error (the items are the same for both models, so the margin is the
    sampling noise of the difference, not of each score)."""
    if not b_acc or not q_acc:
        return []
    out = []
    for name, b in b_acc["tasks"].items():
        q = q_acc["tasks"].get(name)
        if q is None:
            continue
        drop, se = paired_drop(b["per_item"], q["per_item"])
        allowed = tol.category_drop_pct.get(name, tol.accuracy_drop_pct)
        out.append(Check(name=f"task:{name}", description=f"{b['category']}: {b['metric']} on {b['n']} items "
                         f"(delta in points)", baseline=b["score"], quantized=q["score"], delta=-drop,
                         threshold=f"drop <= {allowed:g} points + 1 SE ({se:.1f})",
                         passed=drop <= allowed + se))
    return out
