"""Planted regressions on the real small model: each broken "quantization" must fail the gate
on the check meant for it, and a sound one must pass.

Category plants (``plants.CATEGORY``) damage one capability and leave general text almost
untouched: digit, operator, whitespace or special-token rows, code keywords, capital-city
answers. Whole-model plants (``plants.WHOLE``) damage everything.

The broken checkpoints are written as plain safetensors folders (what a buggy quantizer
could emit) and validated exactly as the DAG validates a quantized checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantpipe import pipeline
from quantpipe.artifacts import uri_to_path
from quantpipe.store import Store

from . import plants

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# the default gate, task checks on (100 items a set; sets the small model answers at chance
# are excluded with their reason, never passed); the plants run it without the task sets
CONF = {"method": "fp8", "bits": 8, "run_name": "planted", "num_prompts": 4, "max_new_tokens": 12,
        "task_limit": 100, "sensitivity_layers": 0, "remediation": False, "deploy": False}
PLANTED = {**plants.CATEGORY, **plants.WHOLE}


# The plants are validated without the task sets: no plant's expected check comes from them (the
# damage is read from held-out text, short answers and sums), and 400 task items per plant cost
# CI ~5 minutes over 12 plants. The sound quantizations below run the default gate with them.
PLANT_CONF = {**CONF, "task_limit": 0}


def _prep(conf: dict):
    settings = pipeline.validate_params(conf, store=Store.local())
    return settings, pipeline.prep_checkpoint(settings, store=Store.local())


@pytest.fixture(scope="module")
def prep(model_dir):
    return _prep(CONF)


@pytest.fixture(scope="module")
def plant_prep(model_dir):
    return _prep(PLANT_CONF)


def _validate(settings, prep, folder: Path, name: str) -> dict:
    quant = {"quantized_uri": folder.as_uri(), "method": name, "scheme": "planted", "seconds": 0.0,
             "size_bytes": (folder / "model.safetensors").stat().st_size}
    return pipeline.run_validation(settings, prep, quant, f"planted-{name}", store=Store.local())


@pytest.mark.parametrize("name", list(PLANTED))
def test_planted_regression_fails_the_right_check(name, plant_prep, model_dir, tmp_path):
    settings, p = plant_prep
    edit, expected = PLANTED[name]
    res = _validate(settings, p, plants.plant(model_dir, tmp_path / name, edit), name)
    assert res["verdict"] == "FAIL" and not res["passed"], res
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
    settings = pipeline.validate_params({**CONF, **SOUND[name], "run_name": f"sound-{name}"}, store=Store.local())
    _, p = prep  # the checkpoint and its cached baseline (evaluation settings are the same)
    calib = pipeline.build_calibration(settings, p, store=Store.local())
    quant = pipeline.run_quantization(settings, p, calib, store=Store.local())
    res = pipeline.run_validation(settings, p, quant, f"planted-sound-{name}", store=Store.local())
    assert res["verdict"] == "PASS" and res["passed"], (name, res["failed_checks"], res["inconclusive_checks"])
    assert res["mean_kl"] is not None and res["mean_kl"] < 0.25
    report = json.loads((uri_to_path(res["report_folder_uri"]) / "report.json").read_text())
    assert all(c["low"] is not None and c["detectable"] is not None for c in report["checks"])
    assert any(c["name"].startswith("task:") for c in report["checks"]) or report["excluded_checks"]
    assert pipeline.gate(res) is True
