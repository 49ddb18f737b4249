"""Unit tests: report lookup stays inside the store; the extra links pick the right URL."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

import quantpipe_reports_store as store


def _report(root, run_dir, name, passed=True):
    f = root / "runs" / run_dir / name
    f.mkdir(parents=True)
    (f / "report.html").write_text("<body><p id='verdict'>PASSED</p></body>")
    (f / "report.json").write_text(json.dumps({"passed": passed, "failed_checks": [], "run_id": run_dir,
                                               "quantization": {"method": "fp8", "scheme": "FP8_DYNAMIC"}}))
    return f


def test_newest_report_first_and_by_name(tmp_path):
    _report(tmp_path, "r1", "validation-fp8-20260101T000000")
    _report(tmp_path, "r1", "remediation1-gptq-20260101T000100", passed=False)
    (tmp_path / "runs" / "r1" / "approved").mkdir()  # not a report
    (tmp_path / "runs" / "r1" / ".validation-fp8-20260101T000200.tmp").mkdir()  # half-written
    refs = store.reports_for_run(tmp_path, "r1")
    assert [r.name for r in refs] == ["remediation1-gptq-20260101T000100", "validation-fp8-20260101T000000"]
    assert store.find_report(tmp_path, "r1").name.startswith("remediation1")
    assert store.find_report(tmp_path, "r1", "validation-fp8-20260101T000000").html.is_file()
    assert [r["passed"] for r in store.index(tmp_path)] == [False, True]


def test_run_ids_are_mapped_like_the_pipeline(tmp_path):
    run_id = "manual__2026-01-01T00:00:00+00:00"
    _report(tmp_path, "manual__2026-01-01T00_00_00_00_00", "validation-fp8-20260101T000000")
    assert store.find_report(tmp_path, run_id).run_dir == "manual__2026-01-01T00_00_00_00_00"


@pytest.mark.parametrize("run_id", ["..", ".", "", "../..", "a/../../etc", ".hidden", "x" * 300])
def test_traversal_and_odd_run_ids_are_refused(tmp_path, run_id):
    (tmp_path / "secret").write_text("x")
    with pytest.raises(store.ReportNotFound):
        store.find_report(tmp_path, run_id)


@pytest.mark.parametrize("name", ["../r2/validation-fp8-20260101T000000", "..", "report.html",
                                  "validation-fp8-20260101T000000/../x"])
def test_report_names_must_be_plain(tmp_path, name):
    _report(tmp_path, "r1", "validation-fp8-20260101T000000")
    with pytest.raises(store.ReportNotFound):
        store.find_report(tmp_path, "r1", name)


def test_symlinked_report_folders_are_ignored(tmp_path):
    outside = tmp_path / "outside" / "validation-fp8-20260101T000000"
    outside.mkdir(parents=True)
    (outside / "report.html").write_text("secret")
    (tmp_path / "runs" / "r1").mkdir(parents=True)
    (tmp_path / "runs" / "r1" / "validation-fp8-20260101T000000").symlink_to(outside)
    with pytest.raises(store.ReportNotFound):
        store.find_report(tmp_path, "r1")


def test_report_from_uri():
    assert store.report_from_uri(None, "file:///s/runs/r1/validation-fp8-20260101T000000/report.html") == \
        ("r1", "validation-fp8-20260101T000000")
    assert store.report_from_uri(None, "s3://b/q/runs/r1/validation-fp8-20260101T000000") == \
        ("r1", "validation-fp8-20260101T000000")
    assert store.report_from_uri(None, "file:///etc/passwd") is None


def test_extra_links_apply_by_task_id(monkeypatch):
    import quantpipe_reports as plugin

    values = {"validate": {"report_folder_uri": "file:///s/runs/r1/validation-fp8-20260101T000000"},
              "deploy": {"endpoint": "http://127.0.0.1:8000/v1"}}
    monkeypatch.setattr(plugin, "read_return_value", lambda dag_id, run_id, task_id, mi: values.get(task_id))
    monkeypatch.setattr(plugin, "_base_url", lambda: "http://127.0.0.1:8080")

    def key(task_id):
        return SimpleNamespace(dag_id="llm_quantization", run_id="manual__x+1", task_id=task_id, map_index=-1)

    rep, dep = plugin.ValidationReportLink(), plugin.DeployedEndpointLink()
    assert rep.get_link(None, ti_key=key("validate")) == \
        "http://127.0.0.1:8080/quantpipe/reports/llm_quantization/manual__x%2B1/validation-fp8-20260101T000000"
    assert rep.get_link(None, ti_key=key("gate")) == ""
    assert dep.get_link(None, ti_key=key("deploy")) == "http://127.0.0.1:8000/v1"
    assert dep.get_link(None, ti_key=key("validate")) == ""
    values["deploy"] = {"endpoint": "javascript:alert(1)"}
    assert dep.get_link(None, ti_key=key("deploy")) == ""
