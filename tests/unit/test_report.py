from quantpipe.settings import Tolerances
from quantpipe.validation.checks import run_checks
from quantpipe.validation.report import build_report, render_html
from tests.unit.test_checks import BASE, _m


def test_report_json_and_html_carry_the_verdict():
    q = _m(30.0, 0.40, list(range(1, 11)), [[1, 2, 3, 4], [5, 6, 7, 8]])
    checks, cons = run_checks(BASE, q, Tolerances())
    rep = build_report(run_id="r<1>", model={"path": "/m", "num_parameters": 1e6, "size_bytes": 2e6},
                       quantization={"method": "gptq", "scheme": "W4A16", "size_bytes": 1e6, "seconds": 3.0},
                       baseline=BASE, quantized=q, checks=checks, consistency=cons,
                       tolerances=Tolerances().model_dump())
    assert rep["passed"] is False and rep["failed_checks"] == ["perplexity"]
    assert "top1" not in rep["perplexity"]["baseline"]
    page = render_html(rep)
    assert "FAILED: perplexity" in page and "r&lt;1&gt;" in page and "data:image/png;base64," in page
