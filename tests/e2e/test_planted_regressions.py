"""Planted regressions on the real small model: each broken "quantization" must fail the gate
on the check that should catch it, and a sound one must pass.

The broken checkpoints are written as plain safetensors folders (what a buggy quantizer
could emit) and validated exactly as the DAG validates a quantized checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from quantpipe import pipeline
from quantpipe.quantization.run import PROVENANCE

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CONF = {"method": "fp8", "bits": 8, "run_name": "planted", "ppl_max_tokens": 1024, "num_prompts": 4,
        "max_new_tokens": 12, "task_limit": 0, "sensitivity_layers": 0, "remediation": False, "deploy": False}


def _plant(model_dir: Path, out: Path, edit) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out, ignore=shutil.ignore_patterns("MANIFEST.json"))
    tensors = load_file(str(out / "model.safetensors"))
    with torch.no_grad():
        edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / PROVENANCE).write_text(json.dumps({"planted": True}))
    return out


def _rtn_2bit(t, group: int = 64):
    import torch

    w = t.float().reshape(-1, group)
    lo, hi = w.min(1, keepdim=True).values, w.max(1, keepdim=True).values
    scale = ((hi - lo) / 3).clamp_min(1e-8)
    q = torch.round((w - lo) / scale).clamp(0, 3)
    return (q * scale + lo).reshape(t.shape).to(t.dtype)


def two_bit(ts):
    for k in list(ts):
        if k.endswith("proj.weight"):
            ts[k] = _rtn_2bit(ts[k])


def scales_perturbed(ts):
    # what a wrong per-channel scale does: some output channels of every MLP come out 3x too large
    for k in list(ts):
        if k.endswith("mlp.down_proj.weight"):
            ts[k][::7] *= 3.0


def block_zeroed(ts):
    for k in list(ts):
        if k.startswith("model.layers.12.") and k.endswith("proj.weight"):
            ts[k].zero_()


def lm_head_crushed(ts):
    # the (tied) output projection scaled down: the argmax survives, the distribution does not
    key = "lm_head.weight" if "lm_head.weight" in ts else "model.embed_tokens.weight"
    ts[key] *= 0.35


PLANTED = {
    "two_bit": (two_bit, {"perplexity", "kl_divergence", "top1_agreement"}),
    "scales_perturbed": (scales_perturbed, {"perplexity", "kl_divergence"}),
    "block_zeroed": (block_zeroed, {"kl_divergence", "top1_agreement", "perplexity"}),
    "lm_head_crushed": (lm_head_crushed, {"perplexity", "kl_divergence"}),
}


@pytest.fixture(scope="module")
def prep(model_dir):
    settings = pipeline.validate_params(CONF)
    return settings, pipeline.prep_checkpoint(settings)


def _validate(settings, prep, folder: Path, name: str) -> dict:
    quant = {"quantized_uri": folder.as_uri(), "method": name, "scheme": "planted", "seconds": 0.0,
             "size_bytes": (folder / "model.safetensors").stat().st_size}
    return pipeline.run_validation(settings, prep, quant, f"planted-{name}")


@pytest.mark.parametrize("name", list(PLANTED))
def test_planted_regression_fails_the_right_check(name, prep, model_dir, tmp_path):
    settings, p = prep
    edit, expected = PLANTED[name]
    res = _validate(settings, p, _plant(model_dir, tmp_path / name, edit), name)
    assert not res["passed"], res
    assert set(res["failed_checks"]) & expected, (name, res["failed_checks"])
    assert pipeline.gate(res) is False


# sound quantizations: each must pass the default gate (calibration kept small for CI's CPU)
SOUND = {
    "fp8": {"method": "fp8", "bits": 8},
    "w8a8": {"method": "w8a8", "bits": 8, "calibration_samples": 16, "max_seq_length": 128},
    # the default 4-bit GPTQ recipe (zero points, MSE scale search) at group 32
    "gptq_w4a16": {"method": "gptq", "bits": 4, "group_size": 32, "calibration_samples": 32, "max_seq_length": 256},
}


@pytest.mark.parametrize("name", list(SOUND))
def test_sound_quantization_passes(name, prep):
    settings = pipeline.validate_params({**CONF, **SOUND[name], "run_name": f"sound-{name}"})
    _, p = prep  # the checkpoint and its cached baseline (evaluation settings are the same)
    calib = pipeline.build_calibration(settings, p)
    quant = pipeline.run_quantization(settings, p, calib)
    res = pipeline.run_validation(settings, p, quant, f"planted-sound-{name}")
    assert res["passed"], (name, res["failed_checks"])
    assert res["mean_kl"] is not None and res["mean_kl"] < 0.25
    assert pipeline.gate(res) is True
