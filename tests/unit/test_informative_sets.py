"""The candidate is measured only on the task sets its baseline can show damage on
(``pipeline.informative``); the rest are reported as excluded whatever the candidate scores."""

from __future__ import annotations

from pathlib import Path

from quantpipe.pipeline import informative
from quantpipe.settings import Tolerances
from quantpipe.validation.suite import TaskSuite


def _suite(*names: str) -> TaskSuite:
    return TaskSuite(folders=(Path("/nowhere"),), names=names, limit=100)


def _set(score: float, chance: float, n: int = 100) -> dict:
    return {"score": score, "chance": chance, "n": n}


def test_sets_at_chance_are_dropped_the_others_kept_in_order():
    base = {"tasks": {"piqa": _set(0.55, 0.5), "capitals": _set(0.925, 0.25, 40), "asdiv": _set(0.04, 0.0)}}
    got = informative(_suite("piqa", "capitals", "asdiv", "mine"), base, Tolerances())
    assert got.names == ("capitals", "mine")  # "mine": no baseline result, measured (its check names why)
    assert got.limit == 100 and got.folders == (Path("/nowhere"),)


def test_a_per_set_tolerance_decides_what_is_informative():
    base = {"tasks": {"piqa": _set(0.72, 0.5)}}
    assert informative(_suite("piqa"), base, Tolerances()).names == ("piqa",)  # 22 points above, 10 tolerated
    wide = Tolerances(category_drop_pct={"piqa": 25})
    assert informative(_suite("piqa"), base, wide).names == ()


def test_no_suite_or_no_baseline_results_change_nothing():
    assert informative(None, {"tasks": {}}, Tolerances()) is None
    assert informative(_suite("piqa"), None, Tolerances()).names == ("piqa",)
