import pytest

from quantpipe.settings import Tolerances
from quantpipe.validation.checks import run_checks
from quantpipe.validation.metrics import consistency, top1_agreement


def _m(ppl, acc, top1, gens):
    return {"perplexity": {"perplexity": ppl, "next_token_accuracy": acc, "top1": top1},
            "generations": [{"prompt": f"p{i}", "token_ids": g, "text": str(g)} for i, g in enumerate(gens)],
            "settings": {"max_new_tokens": 4}}


BASE = _m(20.0, 0.40, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [[1, 2, 3, 4], [5, 6, 7, 8]])


def test_consistency_locates_first_divergence():
    c = consistency(BASE["generations"], _m(0, 0, [], [[1, 2, 9, 9], [5, 6, 7, 8]])["generations"])
    assert c["exact_match_rate"] == 0.5
    assert c["token_agreement"] == pytest.approx(6 / 8)
    assert [p["first_divergence"] for p in c["per_prompt"]] == [2, None]


def test_top1_agreement():
    assert top1_agreement([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    with pytest.raises(ValueError):
        top1_agreement([1, 2], [1])


def test_sound_model_passes_every_check():
    q = _m(21.0, 0.39, [1, 2, 3, 4, 5, 6, 7, 8, 9, 0], [[1, 2, 3, 4], [5, 6, 7, 0]])
    checks, _ = run_checks(BASE, q, Tolerances())
    assert all(c.passed for c in checks), checks
    ppl = next(c for c in checks if c.name == "perplexity")
    assert ppl.delta == pytest.approx(5.0)


@pytest.mark.parametrize("q,failing", [
    (_m(23.0, 0.40, list(range(1, 11)), [[1, 2, 3, 4]] * 1 + [[5, 6, 7, 8]]), {"perplexity"}),
    (_m(20.0, 0.30, list(range(1, 11)), [[1, 2, 3, 4], [5, 6, 7, 8]]), {"next_token_accuracy"}),
    (_m(20.0, 0.40, [1, 2, 3, 4, 5, 0, 0, 0, 0, 0], [[1, 2, 3, 4], [5, 6, 7, 8]]), {"top1_agreement"}),
    (_m(20.0, 0.40, list(range(1, 11)), [[0, 0, 0, 0], [0, 0, 0, 0]]), {"greedy_consistency"}),
])
def test_each_regression_fails_its_own_check(q, failing):
    checks, _ = run_checks(BASE, q, Tolerances())
    assert {c.name for c in checks if not c.passed} == failing


def _with_acc(m, items):
    m = dict(m)
    m["accuracy"] = {"tasks": {"qp_piqa": {"score": sum(items) / len(items), "metric": "acc", "n": len(items),
                                           "category": "physical commonsense", "per_item": items}}}
    return m


def test_category_check_uses_paired_items_and_tolerance():
    base = _with_acc(BASE, [1.0] * 10 + [0.0] * 10)
    same = _with_acc(_m(20.0, 0.40, list(range(1, 11)), [[1, 2, 3, 4], [5, 6, 7, 8]]), [1.0] * 10 + [0.0] * 10)
    checks, _ = run_checks(base, same, Tolerances())
    cat = next(c for c in checks if c.name == "task:qp_piqa")
    assert cat.passed and cat.delta == 0
    broken = _with_acc(_m(20.0, 0.40, list(range(1, 11)), [[1, 2, 3, 4], [5, 6, 7, 8]]), [0.0] * 20)
    checks, _ = run_checks(base, broken, Tolerances())
    cat = next(c for c in checks if c.name == "task:qp_piqa")
    assert not cat.passed and cat.delta == -50
    # a per-category override lets this category through
    checks, _ = run_checks(base, broken, Tolerances(category_drop_pct={"qp_piqa": 60}))
    assert next(c for c in checks if c.name == "task:qp_piqa").passed


def test_kl_check():
    q = _m(20.0, 0.40, list(range(1, 11)), [[1, 2, 3, 4], [5, 6, 7, 8]])
    q["perplexity"]["kl"] = {"mean": 0.4, "p95": 1.0, "max": 2.0, "histogram": {}}
    checks, _ = run_checks(BASE, q, Tolerances())
    assert {c.name for c in checks if not c.passed} == {"kl_divergence"}
