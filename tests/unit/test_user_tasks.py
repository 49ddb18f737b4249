"""The user's own lm-eval tasks: staged by content, refused before heavy work when they cannot
be measured (naming the file and why), and resolved into the worker's suite."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from quantpipe import pipeline
from quantpipe.assets.tasks import CPU_SUITE, GPU_SUITE
from quantpipe.errors import PipelineError
from quantpipe.settings import EvalSettings
from quantpipe.validation import user_tasks
from quantpipe.validation.suite import build_suite
from quantpipe.store import Store

SHIPPED = Path(__file__).resolve().parents[1] / "data" / "user_tasks"


@pytest.fixture
def folder(tmp_path) -> Path:
    dst = tmp_path / "mine"
    shutil.copytree(SHIPPED, dst)
    return dst


def _yaml(folder: Path) -> Path:
    return folder / "capitals.yaml"


def test_staged_copy_reads_its_data_wherever_the_worker_runs(folder, tmp_path, monkeypatch):
    staged = user_tasks.stage(str(folder), tmp_path / "cache")
    monkeypatch.chdir(tmp_path)  # lm-eval resolves relative data paths against the working directory
    found = user_tasks.check(staged)
    assert found["capitals"]["items"] == 120 and found["capitals"]["output_type"] == "multiple_choice"
    text = (staged / "capitals.yaml").read_text()
    assert str(staged / "data" / "capitals.jsonl") in text
    assert user_tasks.stage(str(folder), tmp_path / "cache") == staged  # same content: same copy
    with open(folder / "data" / "capitals.jsonl", "a") as f:
        f.write(json.dumps({"country": "Nepal", "choices": ["Kathmandu", "Lima", "Oslo", "Rome"], "answer": 0}) + "\n")
    again = user_tasks.stage(str(folder), tmp_path / "cache")
    assert again != staged and user_tasks.check(again)["capitals"]["items"] == 121  # new content: new key


BROKEN = {
    "not YAML": (lambda y: y.write_text("task: [unclosed\n"), "not valid YAML"),
    "code hook": (lambda y: y.write_text(y.read_text().replace('doc_to_text: "Question', 'doc_to_text: !function '
                                                               'utils.x\n#"')), "may not run code"),
    "hub data": (lambda y: y.write_text(y.read_text().replace("dataset_path: json", "dataset_path: cais/mmlu")),
                 "fetched from a hub"),
    "missing data": (lambda y: (y.parent / "data" / "capitals.jsonl").unlink(), "capitals.jsonl is missing"),
    "empty data": (lambda y: (y.parent / "data" / "capitals.jsonl").write_text(""), "is empty"),
    "no 0/1 metric": (lambda y: y.write_text(y.read_text().replace("metric: acc", "metric: perplexity")),
                      "first metric in metric_list"),
    "rolling": (lambda y: y.write_text(y.read_text().replace("output_type: multiple_choice",
                                                             "output_type: loglikelihood_rolling")), "output_type"),
    "built-in name": (lambda y: y.write_text(y.read_text().replace("task: capitals", "task: qp_piqa")),
                      "name of a built-in set"),
    "duplicate": (lambda y: (y.parent / "again.yaml").write_text(y.read_text()), "also defined in"),
    "bad field": (lambda y: y.write_text(y.read_text().replace("{{country}}", "{{nation}}")), "capitals"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_folder_is_refused_naming_the_file(case, folder, tmp_path):
    edit, words = BROKEN[case]
    edit(_yaml(folder))
    with pytest.raises(user_tasks.UserTasksError) as e:
        user_tasks.check(user_tasks.stage(str(folder), tmp_path / "cache"))
    assert words in str(e.value), str(e.value)
    assert ".yaml" in str(e.value) or "capitals" in str(e.value)


def test_validate_params_refuses_before_any_heavy_work(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTPIPE_CACHE", str(tmp_path / "cache"))
    (folder / "data" / "capitals.jsonl").unlink()
    with pytest.raises(PipelineError, match="capitals.jsonl is missing"):
        pipeline.validate_params({"user_tasks_uri": str(folder)}, store=Store.local())
    with pytest.raises(PipelineError, match="unknown task sets"):
        pipeline.validate_params({"tasks": ["qp_piqa", "capitalz"]}, store=Store.local())
    with pytest.raises(PipelineError, match="not a folder"):
        pipeline.validate_params({"user_tasks_uri": str(tmp_path / "nowhere")}, store=Store.local())


def test_validate_params_accepts_the_users_task_names(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTPIPE_CACHE", str(tmp_path / "cache"))
    out = pipeline.validate_params({"user_tasks_uri": str(folder), "tasks": ["capitals", "qp_piqa"]}, store=Store.local())
    assert out["evaluation"]["tasks"] == ["capitals", "qp_piqa"]


def test_worker_suite_cpu_gpu_explicit_and_off(folder, tmp_path, cache_dir):
    staged = user_tasks.stage(str(folder), tmp_path / "cache")
    cpu = build_suite(EvalSettings(task_limit=10), "cpu", cache_dir, staged)
    assert cpu.names == (*CPU_SUITE, "capitals") and cpu.folders[1] == staged and cpu.code is None
    gpu = build_suite(EvalSettings(task_limit=10), "cuda", cache_dir, None, hidden_paths=(tmp_path,))
    assert set(gpu.names) | set(gpu.unavailable) == set(GPU_SUITE)
    assert cpu.key != gpu.key
    mine = build_suite(EvalSettings(task_limit=10, tasks=("capitals",)), "cuda", cache_dir, staged)
    assert mine.names == ("capitals",) and mine.code is None
    assert build_suite(EvalSettings(task_limit=0), "cuda", cache_dir, staged) is None


def test_report_states_what_a_cpu_worker_leaves_out(cache_dir):
    summary = pipeline.suite_summary(build_suite(EvalSettings(task_limit=10), "cpu", cache_dir), "cpu-float32")
    assert summary["measured"] == list(CPU_SUITE) and summary["items_per_set"] == 10
    assert set(summary["not_measured"]) == set(GPU_SUITE) - set(CPU_SUITE)
    assert all("name it in tasks" in why for why in summary["not_measured"].values())
    off = pipeline.suite_summary(None, "cpu-float32")
    assert off["measured"] == [] and set(off["not_measured"]) == set(GPU_SUITE)


ANSWERS = Path(__file__).resolve().parents[1] / "data" / "user_answers"


def test_answers_file_joins_the_answer_prompts_and_is_checked(tmp_path, cache_dir):
    staged = user_tasks.stage(str(ANSWERS), tmp_path / "cache")  # answers only: no task YAML needed
    found = user_tasks.check(staged)
    assert found["answers.jsonl"]["items"] == 24 and "answers:capitals" in found["answers.jsonl"]["metric"]
    rows = user_tasks.read_answers(staged)
    assert rows[0]["expected"] == "paris" and {r["kind"] for r in rows} == {"capitals"}
    suite = build_suite(EvalSettings(task_limit=0), "cpu", cache_dir, staged)
    assert suite is not None and suite.names == () and len(suite.answers) == 24  # asked with task sets off
    for bad, words in (('{"prompt": "x"}', "must start with a word"), ("not json", "not valid JSON"),
                       ('{"answer": "y"}', "non-empty string field 'prompt'"), ('{"prompt": "x", "answer": "y", "kind": "A B"}',
                                                                   "lower-case name")):
        (tmp_path / "bad").mkdir(exist_ok=True)
        (tmp_path / "bad" / "answers.jsonl").write_text(bad + "\n")
        with pytest.raises(user_tasks.UserTasksError, match=words):
            user_tasks.check(user_tasks.stage(str(tmp_path / "bad"), tmp_path / "cache"))
