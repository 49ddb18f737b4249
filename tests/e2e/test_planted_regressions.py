"""Planted regressions on the real small model: each broken "quantization" must fail the gate
on the check meant for it, and a sound one must pass.

Category plants (``plants.CATEGORY``) damage one capability and leave general text almost
untouched: digit, operator, whitespace or special-token rows, code keywords, capital-city
answers. Whole-model plants (``plants.WHOLE``) damage everything (two of them, gross damage
of a kind the others already meet, run in ``bench/gate_distributions.py`` only). File plants
(``plants.FILES``) keep the baseline's weights and change what is served beside them: the
end-of-sequence id, the chat template, the rotary base.

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
from .plants import GPTQ_SOUND

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# the default gate, task checks on: a task set this model can show damage on, the example user
# task (120 capital-city questions, baseline 0.92 on 100), named as a user names their own sets,
# with the tolerance its other tests and the README give it (15 points; a 135M model at 4 bits
# loses a few points of capitals, which 100 items cannot prove to be under 10). The worker's
# built-in sets sit at chance on this model and are excluded with their reason whatever the
# candidate scores (test_dag_e2e, test_informative_sets; bench/gate_distributions.py runs the
# plants with them).
USER_TASKS = Path(__file__).resolve().parents[1] / "data" / "user_tasks"
CONF = {"method": "fp8", "bits": 8, "run_name": "planted", "num_prompts": 4, "max_new_tokens": 12,
        "task_limit": 100, "tasks": ["capitals"], "user_tasks_uri": str(USER_TASKS),
        "category_drop_pct": {"capitals": 15}, "sensitivity_layers": 0, "remediation": False, "deploy": False}
PLANTED = plants.SUITE  # plants.BENCH_ONLY run in bench/gate_distributions.py


def _prep(conf: dict):
    settings = pipeline.validate_params(conf, store=Store.local())
    return settings, pipeline.prep_checkpoint(settings, store=Store.local())


@pytest.fixture(scope="module")
def prep(model_dir):
    return _prep(CONF)


def _validate(settings, prep, folder: Path, name: str) -> dict:
    quant = {"quantized_uri": folder.as_uri(), "method": name, "scheme": "planted", "seconds": 0.0,
             "size_bytes": (folder / "model.safetensors").stat().st_size}
    return pipeline.run_validation(settings, prep, quant, f"planted-{name}", store=Store.local())


def _report(res: dict) -> dict:
    return json.loads((uri_to_path(res["report_folder_uri"]) / "report.json").read_text())


@pytest.mark.parametrize("name", list(PLANTED))
def test_planted_regression_fails_the_right_check(name, prep, model_dir, tmp_path):
    """The default gate (task sets on) blocks each plant on the check meant for it. Once a
    check has failed with confidence, the task sets are not measured (fail_fast) and the
    report says so for each set."""
    settings, p = prep
    expected = PLANTED[name][1]
    res = _validate(settings, p, plants.build(name, model_dir, tmp_path / name), name)
    assert res["verdict"] == "FAIL" and not res["passed"], res
    assert set(res["failed_checks"]) & expected, (name, res["failed_checks"])
    assert pipeline.gate(res) is False
    report = _report(res)
    tasks = {c["name"]: c for c in report["checks"] if c["name"].startswith("task:")}
    assert "task:capitals" in tasks, "the informative set is checked, not excluded"
    for c in tasks.values():  # measured, or not measured once a check had failed (fail_fast): never a pass
        assert c["verdict"] == "FAIL" or (c["verdict"] == "INCONCLUSIVE" and "fail_fast" in c["note"]), c
    excluded = {e["name"] for e in report["excluded_checks"]}
    assert set(tasks) | excluded >= {f"task:{n}" for n in report["suite"]["measured"]}


# sound quantizations: each must pass the default gate. W8A8 (calibration 16 x 128) goes
# through the same gate, task checks on, in the compose stack test (tests/infra/
# test_compose_stack.py, run by make test after this suite).
SOUND = {
    "fp8": {"method": "fp8", "bits": 8},
    # the default 4-bit GPTQ recipe (zero points, MSE scale search) at group 32; test_dag_e2e's
    # GPTQ run quantizes with these settings, so the session's store holds the checkpoint
    "gptq_w4a16": GPTQ_SOUND,
}


@pytest.mark.parametrize("name", list(SOUND))
def test_sound_quantization_passes(name, prep):
    settings = pipeline.validate_params({**CONF, **SOUND[name], "run_name": f"sound-{name}"}, store=Store.local())
    _, p = prep  # the checkpoint and its cached baseline (evaluation settings are the same)
    calib = pipeline.build_calibration(settings, p, store=Store.local())
    quant = pipeline.run_quantization(settings, p, calib, store=Store.local())
    res = pipeline.run_validation(settings, p, quant, f"planted-sound-{name}", store=Store.local())
    report = _report(res)
    figures = {c["name"]: (c["verdict"], c["estimate"], c["low"], c["high"], c["limit"], c["n"])
               for c in report["checks"] if c["verdict"] != "PASS" or c["name"].startswith(("task:", "answers:"))}
    print(name, "checks (verdict, estimate, low, high, limit, n):", figures)
    assert res["verdict"] == "PASS" and res["passed"], (name, res["failed_checks"], res["inconclusive_checks"], figures)
    assert res["mean_kl"] is not None and res["mean_kl"] < 0.25
    assert not [c["name"] for c in report["checks"] if c["group"] in ("weights", "files", "blocks") and c["verdict"] != "PASS"]
    assert all(c["low"] is not None and c["detectable"] is not None for c in report["checks"])
    assert any(c["name"].startswith("task:") for c in report["checks"]) or report["excluded_checks"]
    assert pipeline.gate(res) is True
