from quantpipe.settings import Tolerances
from quantpipe.validation.checks import run_checks
from quantpipe.validation.report import build_report, render_html
from tests.unit.test_checks import _classes, _measured, _positions


def test_report_json_and_html_carry_verdicts_intervals_and_detectable():
    base, cand = _measured(answers_right=30, lost=15)
    checks, side = run_checks(base, cand, Tolerances(), _positions(damage_digits=0.6), _classes(), [])
    rep = build_report(run_id="r<1>", model={"path": "/m", "num_parameters": 1e6, "size_bytes": 2e6},
                       quantization={"method": "gptq", "scheme": "W4A16", "size_bytes": 1e6, "seconds": 3.0},
                       baseline={**base, "perplexity": {"perplexity": 20.0, "top1": [1]}},
                       quantized={**cand, "perplexity": {"perplexity": 21.0, "top1": [1]}}, checks=checks,
                       consistency=side["consistency"], tolerances=Tolerances().model_dump())
    rep["answers"] = side["answers"]
    rep["suite"] = {"engine": "cpu-float32", "measured": ["qp_piqa"], "items_per_set": 100,
                    "not_measured": {"qp_humaneval": "not in this worker's default suite"}}
    assert rep["verdict"] == "FAIL" and rep["passed"] is False
    assert {"kl:class:digits", "answers:fact"} <= set(rep["failed_checks"])
    assert "top1" not in rep["perplexity"]["baseline"]
    assert all({"low", "high", "verdict", "detectable"} <= set(c) for c in rep["checks"])
    page = render_html(rep)
    assert "FAILED: " in page and "kl:class:digits" in page and "r&lt;1&gt;" in page
    assert "<b>qp_humaneval</b> not measured: not in this worker" in page and "qp_piqa (100 items" in page
    assert "data:image/png;base64," in page and "detectable" in page and "15 of 40 short answers changed" in page
