"""The whole DAG on the real small model through ``dag.test()`` (LocalExecutor semantics, in process)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from quantpipe.artifacts import uri_to_path, verify_folder

from .plants import GPTQ_SOUND

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FAST = {"calibration_samples": 16, "max_seq_length": 128, "ppl_max_tokens": 1024, "num_prompts": 4,
        "max_new_tokens": 16, "task_limit": 0, "sensitivity_layers": 2, "remediation": False,
        "deploy": False}


@pytest.fixture(scope="module")
def dag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(Path(__file__).resolve().parents[2] / "dags"))
    assert bag.import_errors == {}
    dag = bag.dags["llm_quantization"]
    for t in dag.tasks:  # dag.test() waits out retry delays; a failure here must fail fast
        t.retries = 0
    return dag


def run(dag, conf: dict):
    from airflow.utils.session import create_session

    from quantpipe.form import form_fields

    # every param explicitly: dag.test() keeps params of an earlier run_conf on the DAG object
    full = {name: default for name, (default, _) in form_fields().items()}
    dr = dag.test(run_conf={**full, **conf})
    with create_session() as session:
        tis = {ti.task_id: ti for ti in dr.get_task_instances(session=session)}
        states = {k: str(ti.state) for k, ti in tis.items()}
        xcom = {k: ti.xcom_pull(task_ids=k, session=session) for k, ti in tis.items()} \
            if hasattr(tis.get("validate_params"), "xcom_pull") else {}
    return dr, states, xcom


def _report(artifact_root: Path, run_id: str) -> dict:
    from quantpipe.pipeline import safe_run_id

    folders = sorted((artifact_root / "runs" / safe_run_id(run_id)).glob("validation-*"))
    assert len(folders) == 1, folders
    verify_folder(folders[0])
    return json.loads((folders[0] / "report.json").read_text())


MINE = Path(__file__).resolve().parents[1] / "data" / "user_tasks"  # a user's own lm-eval task folder


def test_fp8_run_passes_the_gate_and_publishes(dag, artifact_root):
    # 4 items a set cannot decide a drop (the gate would say INCONCLUSIVE, and fail); this test is
    # about the DAG's plumbing of the task sets and the user's folder, so the task tolerance is
    # opened and every set is shown as excluded with its reason (test_user_tasks_e2e decides one)
    dr, states, _ = run(dag, {**FAST, "method": "fp8", "bits": 8, "run_name": "e2e-fp8", "task_limit": 4,
                              "task_drop_pct": 100, "user_tasks_uri": str(MINE),
                              "tasks": ["qp_piqa", "qp_asdiv", "qp_mmlu", "qp_gsm8k", "qp_humaneval", "capitals"]})
    assert str(dr.state) == "success", states
    assert states["quantize_fp8"] == "success" and states["quantize"] == "skipped"
    assert states["publish_approved"] == "success"
    rep = _report(artifact_root, dr.run_id)
    assert rep["passed"] and rep["quantization"]["scheme"] == "FP8_DYNAMIC"
    ppl = {c["name"]: c for c in rep["checks"]}["perplexity"]
    assert 5 < ppl["baseline"] < 100 and ppl["baseline"] != ppl["quantized"]
    assert abs(ppl["delta"]) < 10
    names = {c["name"] for c in rep["checks"]}
    assert {"kl_divergence", "top1_agreement", "kl:domain:code", "top1:class:digits", "answers:fact"} <= names
    # every task set is either checked or excluded with its reason (4 items cannot show damage)
    excluded = {x["name"]: x["reason"] for x in rep["excluded_checks"]}
    sets = {"task:qp_piqa", "task:qp_asdiv", "task:qp_mmlu", "task:qp_gsm8k", "task:qp_humaneval", "task:capitals"}
    assert sets <= names | set(excluded) and all(excluded.values())
    code = rep["accuracy"]["baseline"]["tasks"]["qp_humaneval"]
    assert code["metric"] == "pass@1" and code["n"] == 4 and "namespaces" in code["isolation"]
    assert set(rep["suite"]["measured"]) == {x.removeprefix("task:") for x in sets}
    assert all(c["verdict"] == "PASS" and c["low"] <= c["estimate"] <= c["high"] for c in rep["checks"])
    assert 0 < rep["kl"]["mean"] < 0.25 and len(rep["sensitivity"]["layers"]) == 210
    assert rep["accuracy"]["baseline"]["tasks"]["qp_piqa"]["n"] == 4
    assert rep["accuracy"]["baseline"]["tasks"]["capitals"]["category"] == "world capitals (yours)"
    # sets the baseline cannot show damage on are not measured for the candidate
    assert not ((rep["accuracy"]["quantized"] or {}).get("tasks") or {})
    pointer = json.loads((artifact_root / "approved" / "e2e-fp8.json").read_text())
    approved = uri_to_path(pointer["model_uri"])
    verify_folder(approved)
    cfg = json.loads((approved / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    prov = json.loads((approved / "quantpipe.json").read_text())
    assert prov["versions"]["llmcompressor"].startswith("0.14") and prov["timings"]["total_s"] > 0


def _baselines(artifact_root: Path) -> list[Path]:
    """Baselines measured with this module's evaluation settings (other test modules share
    the session's store)."""
    root = artifact_root / "baselines"
    return [b for b in root.iterdir() if not b.name.startswith(".") and
            json.loads((b / "baseline.json").read_text())["settings"]["ppl_max_tokens"] == FAST["ppl_max_tokens"]]


def test_gptq_run_reports_real_figures_and_reuses_the_baseline(dag, artifact_root):
    # the planted suite's sound GPTQ settings (group 32, 32 x 256 calibration): it finds this checkpoint
    dr, states, _ = run(dag, {**FAST, **GPTQ_SOUND, "run_name": "e2e-gptq",
                              "ppl_increase_pct": 100, "accuracy_drop_pct": 20, "min_top1_agreement": 0.5})
    assert str(dr.state) == "success", states
    assert states["quantize"] == "success" and states["quantize_fp8"] == "skipped"
    rep = _report(artifact_root, dr.run_id)
    checks = {c["name"]: c for c in rep["checks"]}
    assert rep["quantization"]["scheme"] == "W4A16_ASYM"  # the default 4-bit GPTQ recipe
    # 4-bit weights move perplexity more than FP8 does, but stay in a sane range
    assert 0 < checks["perplexity"]["delta"] < 100
    assert 0.5 < checks["top1_agreement"]["estimate"] < 1.0
    assert rep["quantization"]["size_bytes"] < rep["model"]["size_bytes"]
    cfg = json.loads((uri_to_path(rep["quantization"]["quantized_uri"]) / "config.json").read_text())
    w = cfg["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["group_size"], w["symmetric"], w["observer"]) == (4, 32, False, "mse")
    assert "lm_head" in cfg["quantization_config"]["ignore"]
    # baseline metrics are cached by checkpoint hash: the strict run below reuses this one's
    assert len(_baselines(artifact_root)) == 2  # one per evaluation setting (task_limit 4 in the fp8 run, 0 here)


def test_impossible_tolerance_closes_the_gate(dag, artifact_root):
    dr, states, _ = run(dag, {**FAST, "method": "fp8", "bits": 8, "run_name": "e2e-strict",
                              "ppl_increase_pct": 0, "min_top1_agreement": 1.0})
    assert states["validate"] == "success"
    assert states["gate"] == "success" and states["publish_approved"] == "skipped"
    assert states["deploy"] == "skipped"  # a closed gate deploys nothing
    assert not (artifact_root / "approved" / "e2e-strict.json").exists()
    rep = _report(artifact_root, dr.run_id)
    assert not rep["passed"] and "top1_agreement" in rep["failed_checks"]
    assert len(_baselines(artifact_root)) == 2  # reused the gptq run's baseline: nothing recomputed


def test_bad_params_stop_at_validation(dag):
    dr, states, _ = run(dag, {"method": "fp8", "bits": 4})
    assert str(dr.state) == "failed"
    assert states["validate_params"] == "failed"
    assert states["prep_checkpoint"] == "upstream_failed"


def test_corrupt_checkpoint_is_refused(dag, model_dir, tmp_path):
    bad = tmp_path / "corrupt"
    shutil.copytree(model_dir, bad)
    with open(bad / "model.safetensors", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02\x03")
    dr, states, _ = run(dag, {**FAST, "method": "fp8", "bits": 8, "model_uri": str(bad)})
    assert str(dr.state) == "failed"
    assert states["prep_checkpoint"] == "failed"
    assert states["quantize_fp8"] in ("upstream_failed", "skipped")


def test_remediation_turns_a_failing_recipe_into_a_passing_one(dag, artifact_root):
    # FP8 on every layer moves held-out perplexity by +1.95 % [1.43, 2.47] on these 5 x 2048
    # tokens (measured): not within 1.6 %; keeping the first/last blocks and the 6 most sensitive
    # layers in BF16 more than halves it (3.4 -> 1.5 % measured on prose). No escalation here
    # (time_budget_s 0): the first verdict stands.
    dr, states, _ = run(dag, {**FAST, "method": "fp8", "bits": 8, "run_name": "e2e-remedy", "ppl_max_tokens": 2048,
                              "num_prompts": 2, "max_new_tokens": 8, "sensitivity_layers": 8, "time_budget_s": 0,
                              "ppl_increase_pct": 1.6, "remediation": True,
                              "remediation_attempts": 2})
    assert str(dr.state) == "success", states
    assert states["validate"] == "success" and states["remediate_1"] == "success"
    assert states["remediate_2"] == "skipped" and states["publish_approved"] == "success"
    from quantpipe.pipeline import safe_run_id

    folder = artifact_root / "runs" / safe_run_id(dr.run_id)
    first = json.loads(next(folder.glob("validation-*")).joinpath("report.json").read_text())
    fixed = json.loads(next(folder.glob("remediation1-*")).joinpath("report.json").read_text())
    assert not first["passed"] and "perplexity" in first["failed_checks"] + first["inconclusive_checks"]
    assert fixed["passed"]
    kept = fixed["remediation"]["changes"]["kept_unquantized"]
    assert "lm_head" in kept and len([k for k in kept if k.startswith("model.layers.")]) == 6
    assert fixed["remediation"]["size_vs_first_attempt"] > 1.0  # BF16 layers cost size
    ppl = lambda r: next(c for c in r["checks"] if c["name"] == "perplexity")["delta"]  # noqa: E731
    assert ppl(fixed) < ppl(first)
    record = json.loads((artifact_root / "approved" / "e2e-remedy.json").read_text())
    assert record["remediation_attempt"] == 1 and record["model_uri"] == fixed["quantization"]["quantized_uri"]
