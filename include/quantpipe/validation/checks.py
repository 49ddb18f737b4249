"""Stage 4a: compare quantized against baseline measurements, check by check."""

from __future__ import annotations

from pydantic import BaseModel

from ..settings import Tolerances
from .metrics import consistency


class Check(BaseModel):
    name: str
    description: str
    baseline: float
    quantized: float
    delta: float
    threshold: str
    passed: bool


def run_checks(baseline: dict, quantized: dict, tol: Tolerances) -> tuple[list[Check], dict]:
    b_ppl = baseline["perplexity"]["perplexity"]
    q_ppl = quantized["perplexity"]["perplexity"]
    delta_pct = (q_ppl - b_ppl) / b_ppl * 100
    cons = consistency(baseline["generations"], quantized["generations"])
    checks = [
        Check(name="perplexity", description="held-out perplexity increase (%)", baseline=b_ppl,
              quantized=q_ppl, delta=delta_pct, threshold=f"<= +{tol.ppl_increase_pct:g} %",
              passed=delta_pct <= tol.ppl_increase_pct),
        Check(name="greedy_token_agreement",
              description="share of baseline greedy tokens reproduced before the first divergence",
              baseline=1.0, quantized=cons["token_agreement"], delta=cons["token_agreement"] - 1.0,
              threshold=f">= {tol.min_token_agreement:g}",
              passed=cons["token_agreement"] >= tol.min_token_agreement),
    ]
    if "accuracy" in baseline and "accuracy" in quantized:
        for task, b_acc in baseline["accuracy"].items():
            q_acc = quantized["accuracy"][task]
            drop = (b_acc - q_acc) * 100
            checks.append(Check(name=f"accuracy:{task}", description=f"{task} accuracy drop (points)",
                                baseline=b_acc, quantized=q_acc, delta=-drop,
                                threshold=f"drop <= {tol.accuracy_drop_pct:g} points",
                                passed=drop <= tol.accuracy_drop_pct))
    return checks, cons
