"""Which verdicts go to a person, what the reviewer reads, what is kept of the answer, and what
the gate decides (quantpipe.validation.review: pure, no Airflow)."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from quantpipe.errors import PipelineError
from quantpipe.validation.review import gate_decision, needs_review, review_body, review_record, review_subject
from quantpipe.store import Store

REPORT = "file:///artifacts/runs/r1/validation-fp8-1/report.json"
HTML = "file:///artifacts/runs/r1/validation-fp8-1/report.html"


def _result(verdict: str, inconclusive: str = "fail", review_all: bool = False, **kw) -> dict:
    return {"verdict": verdict, "passed": verdict == "PASS",
            "failed_checks": ["perplexity"] if verdict == "FAIL" else [],
            "inconclusive_checks": ["kl:domain:code", "top1:class:digits"] if verdict == "INCONCLUSIVE" else [],
            "report_uri": REPORT, "report_html_uri": HTML, "report_folder_uri": REPORT.rsplit("/", 1)[0],
            "quant": {"quantized_uri": "file:///q", "method": "fp8", "scheme": "FP8_DYNAMIC"},
            "perplexity_baseline": 20.0, "perplexity_quantized": 20.4,
            "settings": {"run_name": "smollm2",
                         "tolerances": {"inconclusive": inconclusive, "review_all": review_all,
                                        "review_timeout_minutes": 60}}, **kw}


AT = datetime(2026, 5, 1, 12, 30, tzinfo=timezone.utc)
ADMIN = {"id": "admin", "name": "admin"}


def _answer(option: str, user: dict | None = ADMIN, **kw) -> dict:
    return {"chosen_options": [option], "params_input": {}, "responded_by_user": user, "responded_at": AT, **kw}


# --- needs_review -------------------------------------------------------------------------------

@pytest.mark.parametrize("verdict, inconclusive, review_all, expected", [
    ("PASS", "fail", False, False),
    ("PASS", "review", False, False),
    ("PASS", "fail", True, True),
    ("INCONCLUSIVE", "fail", False, False),
    ("INCONCLUSIVE", "review", False, True),
    ("INCONCLUSIVE", "fail", True, True),
    ("INCONCLUSIVE", "review", True, True),
    # FAIL never goes to a person
    ("FAIL", "fail", False, False),
    ("FAIL", "review", False, False),
    ("FAIL", "review", True, False),
])
def test_needs_review(verdict, inconclusive, review_all, expected):
    assert needs_review(_result(verdict, inconclusive, review_all)) is expected


def test_settings_without_review_fields_mean_no_review():
    r = _result("INCONCLUSIVE")
    r["settings"] = {"tolerances": {}}
    assert needs_review(r) is False
    r["settings"] = {}
    assert needs_review(r) is False


def test_result_without_verdict_falls_back_to_passed():
    r = {k: v for k, v in _result("PASS", review_all=True).items() if k != "verdict"}
    assert needs_review(r) is True
    r["passed"] = False
    assert needs_review(r) is False  # counts as FAIL


def test_unknown_verdict_is_refused():
    with pytest.raises(PipelineError, match="unknown validation verdict"):
        needs_review(_result("MAYBE"))


# --- review_body / subject ----------------------------------------------------------------------

def test_body_names_verdict_inconclusive_checks_and_report():
    body = review_body(_result("INCONCLUSIVE", "review"))
    assert "**Verdict: INCONCLUSIVE**" in body
    assert "- `kl:domain:code`" in body and "- `top1:class:digits`" in body
    assert "Inconclusive checks (2)" in body and "Failed checks (0): none" in body
    assert f"[{HTML}]({HTML})" in body
    assert "tolerances.inconclusive = review" in body
    assert "Reject" in body and "timeout" in body


def test_body_of_a_reviewed_pass():
    body = review_body(_result("PASS", review_all=True))
    assert "**Verdict: PASS**" in body and "Inconclusive checks (0): none" in body
    assert "review_all" in body and HTML in body


def test_body_without_report_link():
    r = _result("PASS", review_all=True)
    del r["report_uri"], r["report_html_uri"]
    assert "Report: not available" in review_body(r)


def test_subject_names_run_and_verdict():
    s = review_subject(_result("INCONCLUSIVE", "review"), "manual__2026-05-01")
    assert "smollm2" in s and "INCONCLUSIVE" in s and "manual__2026-05-01" in s


# --- review_record ------------------------------------------------------------------------------

def test_record_of_an_approval():
    rec = review_record(_result("INCONCLUSIVE", "review"), _answer("Approve"))
    assert rec["approved"] is True and rec["chosen_options"] == ["Approve"]
    assert rec["responded_by"] == ADMIN and rec["responded_at"] == AT.isoformat()
    assert rec["timed_out"] is False
    assert rec["verdict"] == "INCONCLUSIVE" and rec["inconclusive_checks"] == ["kl:domain:code", "top1:class:digits"]
    assert rec["report_uri"] == REPORT and rec["report_html_uri"] == HTML
    json.dumps(rec)  # fit for XCom and the artifact store


def test_record_of_a_rejection():
    rec = review_record(_result("PASS", review_all=True), _answer("Reject"))
    assert rec["approved"] is False and rec["chosen_options"] == ["Reject"] and rec["verdict"] == "PASS"


def test_record_of_a_timeout_default():
    rec = review_record(_result("PASS", review_all=True), _answer("Reject", user=None, timedout=True))
    assert rec["approved"] is False and rec["timed_out"] is True and rec["responded_by"] is None


def test_record_keeps_a_string_timestamp_and_a_numeric_user_id():
    rec = review_record(_result("PASS", review_all=True),
                        _answer("Approve", user={"id": 7, "name": "ana"}, responded_at="2026-05-01T12:30:00+00:00"))
    assert rec["responded_by"] == {"id": "7", "name": "ana"}
    assert rec["responded_at"] == "2026-05-01T12:30:00+00:00"


# --- gate_decision ------------------------------------------------------------------------------

def test_pass_without_review_opens():
    assert gate_decision(_result("PASS"), None) is True


def test_fail_always_closes_even_with_an_approval():
    assert gate_decision(_result("FAIL"), None) is False
    approval = review_record(_result("FAIL"), _answer("Approve"))
    assert gate_decision(_result("FAIL", "review", True), approval) is False


def test_inconclusive_without_review_mode_closes():
    assert gate_decision(_result("INCONCLUSIVE", "fail"), None) is False


@pytest.mark.parametrize("verdict, inconclusive, review_all", [
    ("INCONCLUSIVE", "review", False), ("PASS", "fail", True), ("INCONCLUSIVE", "fail", True)])
def test_needed_review_decides(verdict, inconclusive, review_all):
    r = _result(verdict, inconclusive, review_all)
    assert gate_decision(r, review_record(r, _answer("Approve"))) is True
    assert gate_decision(r, review_record(r, _answer("Reject"))) is False
    assert gate_decision(r, review_record(r, _answer("Reject", user=None, timedout=True))) is False


@pytest.mark.parametrize("verdict, inconclusive, review_all", [
    ("INCONCLUSIVE", "review", False), ("PASS", "fail", True)])
def test_needed_review_missing_is_an_error_not_a_pass(verdict, inconclusive, review_all):
    with pytest.raises(PipelineError, match="needs a person's review"):
        gate_decision(_result(verdict, inconclusive, review_all), None)


def test_an_unneeded_review_does_not_open_an_inconclusive_gate():
    r = _result("INCONCLUSIVE", "fail")
    assert gate_decision(r, review_record(r, _answer("Approve"))) is False


# --- the record in the artifact store and in the approval (quantpipe.pipeline) ------------------

@pytest.fixture
def store_root(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTPIPE_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    return tmp_path / "artifacts"


def _settings(**tol) -> dict:
    from quantpipe.settings import PipelineParams

    p = PipelineParams.model_validate({"run_name": "review-unit", "tolerances": tol})
    return p.model_dump(mode="json")


def test_record_review_writes_review_json_once_and_a_new_answer_beside_it(store_root):
    from quantpipe.artifacts import uri_to_path
    from quantpipe.pipeline import record_review

    r = {**_result("PASS", review_all=True), "settings": _settings(review_all=True)}
    rec = review_record(r, _answer("Approve"))
    uri = record_review(r["settings"], r, rec, "manual__2026-05-01T12:00:00", store=Store.local())
    path = uri_to_path(uri)
    assert path == store_root / "runs" / "manual__2026-05-01T12_00_00" / "review" / "review.json"
    kept = json.loads(path.read_text())
    assert kept["approved"] is True and kept["responded_by"] == ADMIN and kept["run_name"] == "review-unit"
    # the same answer again (a gate retry): the same record, nothing new
    assert record_review(r["settings"], r, rec, "manual__2026-05-01T12:00:00", store=Store.local()) == uri
    # a different answer after the review was cleared: kept beside the first, never over it
    uri2 = record_review(r["settings"], r, review_record(r, _answer("Reject")), "manual__2026-05-01T12:00:00", store=Store.local())
    assert uri2.endswith("/review-2/review.json") and json.loads(path.read_text())["approved"] is True


def test_publish_approved_carries_the_review_and_refuses_without_an_approval(store_root):
    from quantpipe.artifacts import uri_to_path
    from quantpipe.pipeline import publish_approved

    s = _settings(inconclusive="review")
    r = {**_result("INCONCLUSIVE", "review"), "settings": s}
    with pytest.raises(PipelineError, match="needs a person's review"):
        publish_approved(s, r, "run-a", store=Store.local())
    with pytest.raises(PipelineError, match="review rejected it"):
        publish_approved(s, r, "run-a", review=review_record(r, _answer("Reject")), store=Store.local())
    assert not (store_root / "runs" / "run-a" / "approved").exists()
    out = publish_approved(s, r, "run-a", review=review_record(r, _answer("Approve")), store=Store.local())
    record = json.loads((uri_to_path(out["record_uri"]) / "approved.json").read_text())
    assert record["review"]["approved"] is True and record["review"]["responded_by"] == ADMIN
    assert record["verdict"] == "INCONCLUSIVE"


def test_publish_approved_of_a_plain_pass_has_no_review(store_root):
    from quantpipe.artifacts import uri_to_path
    from quantpipe.pipeline import publish_approved

    s = _settings()
    out = publish_approved(s, {**_result("PASS"), "settings": s}, "run-b", store=Store.local())
    assert json.loads((uri_to_path(out["record_uri"]) / "approved.json").read_text())["review"] is None
    with pytest.raises(PipelineError, match="verdict is FAIL"):
        publish_approved(s, {**_result("FAIL"), "settings": s}, "run-c", store=Store.local())
