"""The user's own task folder, end to end on the real small model: chosen by a param, measured on
baseline and candidate alike, checked with its own tolerance and shown in the report.

The folder (``tests/data/user_tasks``: 120 four-way questions on capital cities, lm-eval YAML
with its data beside it; plus ``tests/data/user_answers/answers.jsonl``: 24 prompts with the answer
expected) is what a team would bring for its own use case. A checkpoint planted so that
capital-city tokens answer as one another (``plants.capitals_swapped``) must fail on the user's
task and on the user's answers; the unchanged model must pass both.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from quantpipe import pipeline
from quantpipe.artifacts import uri_to_path
from quantpipe.store import Store

from . import plants

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DATA = Path(__file__).resolve().parents[1] / "data"
CONF = {"method": "fp8", "bits": 8, "run_name": "user-tasks", "num_prompts": 2, "max_new_tokens": 8,
        "ppl_max_tokens": 512, "task_limit": 100, "tasks": ["capitals"], "category_drop_pct": {"capitals": 15},
        "sensitivity_layers": 0, "remediation": False, "deploy": False,
        # the user's task is what is under test: measured even after the weights check has failed
        "fail_fast": False}


@pytest.fixture(scope="module")
def prep(model_dir, tmp_path_factory):
    mine = tmp_path_factory.mktemp("mine") / "tasks"
    shutil.copytree(DATA / "user_tasks", mine)
    shutil.copy(DATA / "user_answers" / "answers.jsonl", mine / "answers.jsonl")
    settings = pipeline.validate_params({**CONF, "user_tasks_uri": str(mine)}, store=Store.local())
    return settings, pipeline.prep_checkpoint(settings, store=Store.local())


def _validate(settings, prep, folder: Path, label: str) -> tuple[dict, dict]:
    quant = {"quantized_uri": folder.as_uri(), "method": label, "scheme": "planted", "seconds": 0.0,
             "size_bytes": (folder / "model.safetensors").stat().st_size}
    res = pipeline.run_validation(settings, prep, quant, f"user-tasks-{label}", store=Store.local())
    report = json.loads((uri_to_path(res["report_folder_uri"]) / "report.json").read_text())
    return res, report


def test_users_task_catches_what_it_was_written_for(prep, model_dir, tmp_path):
    settings, p = prep
    res, report = _validate(settings, p, plants.plant(model_dir, tmp_path / "capitals", plants.capitals_swapped),
                            "capitals")
    assert res["verdict"] == "FAIL" and {"task:capitals", "answers:capitals"} <= set(res["failed_checks"]), \
        res["failed_checks"]
    check = {c["name"]: c for c in report["checks"]}["task:capitals"]
    assert check["limit"] == 15 and check["n"] == CONF["task_limit"] and check["low"] > 15, check
    base = report["accuracy"]["baseline"]["tasks"]["capitals"]
    assert base["category"] == "world capitals (yours)" and base["score"] > 0.8 and base["chance"] == 0.25
    assert pipeline.gate(res) is False


def test_users_task_passes_an_unchanged_model(prep, model_dir, tmp_path):
    settings, p = prep
    same = tmp_path / "same"
    shutil.copytree(model_dir, same, ignore=shutil.ignore_patterns("MANIFEST.json"))
    (same / "quantpipe.json").write_text("{}")
    res, report = _validate(settings, p, same, "same")
    check = {c["name"]: c for c in report["checks"]}["task:capitals"]
    assert check["verdict"] == "PASS" and check["estimate"] == 0 and check["high"] < 15, check
    answers = {c["name"]: c for c in report["checks"]}["answers:capitals"]
    assert answers["verdict"] == "PASS" and answers["estimate"] == 0 and answers["n"] >= 10, answers
