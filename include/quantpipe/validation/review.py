"""A person for the grey zone: which verdicts go to a human review, what the reviewer reads,
what is recorded of the answer, and what the gate decides from verdict and answer.

Pure functions over the validation result dict (the XCom of ``validate`` / ``remediate_*``)
and the answer of the review (the XCom of Airflow's ApprovalOperator: ``chosen_options``,
``responded_by_user``, ``responded_at``); no Airflow import.

Rules:
- FAIL never goes to a person: a FAIL always stops the release.
- INCONCLUSIVE goes to a person when ``tolerances.inconclusive == "review"``, else it stops.
- ``tolerances.review_all``: PASS and INCONCLUSIVE both go to a person.
- A review that was needed decides: Approve opens the gate, anything else keeps it closed.
"""

from __future__ import annotations

import logging
from datetime import datetime

from ..errors import PipelineError

log = logging.getLogger(__name__)

PASS, FAIL, INCONCLUSIVE = "PASS", "FAIL", "INCONCLUSIVE"
APPROVE, REJECT = "Approve", "Reject"  # ApprovalOperator's two options


def _verdict(result: dict) -> str:
    v = result.get("verdict")
    if v is None:  # a result from before verdicts: passed or not
        v = PASS if result.get("passed") else FAIL
    if v not in (PASS, FAIL, INCONCLUSIVE):
        raise PipelineError(f"unknown validation verdict {v!r}")
    return v


def _tolerances(result: dict) -> dict:
    return (result.get("settings") or {}).get("tolerances") or {}


def needs_review(result: dict) -> bool:
    """Whether a person decides this result's release."""
    v, tol = _verdict(result), _tolerances(result)
    if v == FAIL:
        return False
    if tol.get("review_all", False):
        return True
    return v == INCONCLUSIVE and tol.get("inconclusive", "fail") == "review"


def review_reason(result: dict) -> str:
    v = _verdict(result)
    if v == INCONCLUSIVE and _tolerances(result).get("inconclusive", "fail") == "review":
        return "the data could not decide some checks (tolerances.inconclusive = review)"
    return "every release is reviewed (tolerances.review_all)"


def review_subject(result: dict, run_id: str) -> str:
    name = (result.get("settings") or {}).get("run_name", "?")
    return f"Release review: {name} ({_verdict(result)}), run {run_id}"


def review_body(result: dict) -> str:
    """Markdown for the reviewer: verdict, failed / inconclusive checks, the report link."""
    v = _verdict(result)
    failed = list(result.get("failed_checks") or [])
    inconclusive = list(result.get("inconclusive_checks") or [])
    quant = result.get("quant") or {}
    lines = [f"**Verdict: {v}**", "", f"Why a person decides: {review_reason(result)}.", ""]
    if quant:
        lines += [f"Model: `{quant.get('quantized_uri', '?')}` ({quant.get('method', '?')}, "
                  f"{quant.get('scheme', '?')})", ""]
    if result.get("attempt"):
        lines += [f"Remediation attempt {result['attempt']}.", ""]
    lines.append(f"Failed checks ({len(failed)}): " + (", ".join(f"`{c}`" for c in failed) if failed else "none"))
    lines.append("")
    lines.append(f"Inconclusive checks ({len(inconclusive)}):" + ("" if inconclusive else " none"))
    lines += [f"- `{c}`: the confidence interval straddles the limit; more data would decide it"
              for c in inconclusive]
    lines.append("")
    figures = [(k, result.get(k)) for k in ("perplexity_baseline", "perplexity_quantized", "top1_agreement",
                                            "mean_kl", "token_agreement")]
    shown = [f"{k} {val:.4g}" for k, val in figures if isinstance(val, (int, float))]
    if shown:
        lines += ["Figures: " + ", ".join(shown), ""]
    link = result.get("report_html_uri") or result.get("report_uri")
    lines.append(f"Report: [{link}]({link})" if link else "Report: not available")
    lines += ["", "**Approve** releases the model; **Reject** (also the answer when nobody answers "
                  "before the timeout) stops the run before publishing."]
    return "\n".join(lines)


def _iso(t) -> str | None:
    if t is None:
        return None
    return t.isoformat() if isinstance(t, datetime) else str(t)


def review_record(result: dict, answer: dict) -> dict:
    """What is kept of a review: who answered, when, the option, approved, the verdict reviewed."""
    chosen = list(answer.get("chosen_options") or [])
    user = answer.get("responded_by_user")
    return {
        "approved": chosen == [APPROVE],
        "chosen_options": chosen,
        "responded_by": ({"id": str(user.get("id")), "name": user.get("name")} if isinstance(user, dict)
                         else None),
        "responded_at": _iso(answer.get("responded_at")),
        # nobody answered: the operator's default (Reject) was applied at the timeout
        "timed_out": bool(answer.get("timedout")) or (user is None and bool(chosen)),
        "verdict": _verdict(result),
        "failed_checks": list(result.get("failed_checks") or []),
        "inconclusive_checks": list(result.get("inconclusive_checks") or []),
        "reason": review_reason(result),
        "report_uri": result.get("report_uri"),
        "report_html_uri": result.get("report_html_uri"),
    }


def gate_decision(result: dict, review: dict | None) -> bool:
    """Open the gate? ``review`` is the ``review_record`` of the answer, or None when nobody was asked.

    Raises PipelineError when a review was needed but none is given (a wiring fault, never a
    silent pass)."""
    v = _verdict(result)
    report = result.get("report_html_uri") or result.get("report_uri")
    if v == FAIL:
        log.warning("gate closed: verdict FAIL (%s failed); see %s", ", ".join(result.get("failed_checks") or []),
                    report)
        return False
    if needs_review(result):
        if review is None:
            raise PipelineError(f"verdict {v} needs a person's review ({review_reason(result)}) "
                                "but no review answer was found")
        who = (review.get("responded_by") or {}).get("name") or "nobody (timeout default)"
        if review.get("approved"):
            log.info("gate open: verdict %s approved by %s", v, who)
            return True
        log.warning("gate closed: verdict %s rejected by %s; see %s", v, who, report)
        return False
    if v == PASS:
        log.info("gate open: all checks passed")
        return True
    log.warning("gate closed: verdict INCONCLUSIVE (%s undecided) and inconclusive verdicts fail; see %s",
                ", ".join(result.get("inconclusive_checks") or []), report)
    return False
