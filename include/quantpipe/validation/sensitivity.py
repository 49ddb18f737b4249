"""Stage 4c: which layers hurt. Per-layer weight error and its effect on held-out loss.

Error: relative Frobenius norm ||W_q - W|| / ||W|| of every quantized Linear (the
quantized checkpoint loaded with dense, dequantized weights). Loss impact: for the
layers with the largest error, the baseline model's held-out NLL with only that
layer's weight replaced by its quantized version, minus the baseline NLL.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


def _nll(model, ids: list[int], window: int) -> float:
    """Mean next-token NLL over the windows: the validation stage's own perplexity pass."""
    from .metrics import perplexity

    return perplexity(model, ids, window)["nll"]


def layer_errors(baseline_model, quantized_model) -> list[dict]:
    import torch

    rows = []
    base = dict(baseline_model.named_modules())
    with torch.no_grad():
        for name, mod in quantized_model.named_modules():
            if not isinstance(mod, torch.nn.Linear) or getattr(mod, "quantization_scheme", None) is None:
                continue
            w = getattr(mod, "weight", None)
            ref = base.get(name)
            if w is None or ref is None or ref.weight.shape != w.shape:
                continue
            r = ref.weight.float()
            err = float((w.float() - r).norm() / r.norm().clamp_min(1e-12))
            rows.append({"layer": name, "rel_error": err})
    rows.sort(key=lambda r: -r["rel_error"])
    return rows


def sensitivity(baseline_model, quantized_model, ids: list[int], window: int, probe: int) -> dict:
    """Ranked per-layer error, with the loss impact of the ``probe`` worst layers."""
    import torch

    t0 = time.perf_counter()
    rows = layer_errors(baseline_model, quantized_model)
    ids = ids[: 2 * window]
    base_nll = _nll(baseline_model, ids, window) if probe and rows else None
    base_mods = dict(baseline_model.named_modules())
    q_mods = dict(quantized_model.named_modules())
    for r in rows[:probe]:
        target = base_mods[r["layer"]]
        saved = target.weight.data.clone()
        with torch.no_grad():
            target.weight.data.copy_(q_mods[r["layer"]].weight.data.to(saved.dtype))
        try:
            r["loss_delta"] = _nll(baseline_model, ids, window) - base_nll
        finally:
            target.weight.data.copy_(saved)
    ranked = sorted(rows, key=lambda r: (-(r.get("loss_delta") if r.get("loss_delta") is not None else -1e9),
                                         -r["rel_error"]))
    log.info("sensitivity: %d quantized layers; worst by loss impact: %s (%.1f s)", len(rows),
             ", ".join(f"{r['layer']} {r.get('loss_delta', 0):+.4f}" for r in ranked[:3]),
             time.perf_counter() - t0)
    return {"layers": ranked, "probed": min(probe, len(rows)), "probe_tokens": len(ids),
            "baseline_nll": base_nll}


def most_sensitive(sens: dict, n: int) -> list[str]:
    return [r["layer"] for r in sens.get("layers", [])[:n]]
