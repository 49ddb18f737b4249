"""Stage 4a: compare quantized against baseline measurements, check by check."""

from __future__ import annotations

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
    return checks, cons
