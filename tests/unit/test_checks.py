"""The gate's checks on synthetic per-position data: damage confined to one slice fails that
slice's check, a missing measurement is INCONCLUSIVE (never skipped), tasks at chance are
excluded with a reason, and known answers lost fail the answer check."""

import numpy as np
import pytest

from quantpipe.settings import Tolerances
from quantpipe.validation.checks import overall_verdict, run_checks
from quantpipe.validation.metrics import consistency, top1_agreement
from quantpipe.validation.slices import BLOCK, Positions, positions_from, slice_masks, token_class_table

VOCAB = 64
DIGITS = list(range(10, 20))


def _classes() -> dict[str, np.ndarray]:
    masks = {c: np.zeros(VOCAB, dtype=bool) for c in ("digits", "operators", "whitespace", "special", "rare")}
    masks["digits"][DIGITS] = True
    masks["operators"][20:24] = True
    masks["whitespace"][24:26] = True
    masks["special"][0] = True
    masks["rare"][60:] = True
    return masks


def _positions(damage_digits: float = 0.0, noise: float = 0.02, seed: int = 0, n: int = 6144,
               damage_math: float = 0.0) -> Positions:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=n).tolist()
    windows = [(i, 512, "prose" if i < n // 2 else "math") for i in range(0, n, 512)]
    p = n - len(windows)
    target = np.concatenate([np.asarray(ids[s + 1:s + w]) for s, w, _ in windows])
    top1_b = rng.integers(0, VOCAB, size=p)
    flip = rng.random(p) < noise
    kl = rng.exponential(noise, size=p)
    hit = np.isin(target, DIGITS)
    if damage_digits:
        flip |= hit & (rng.random(p) < damage_digits)
        kl[hit] += damage_digits * 2
    if damage_math:  # the second half of the windows is math text
        in_math = np.arange(p) >= sum(w - 1 for s, w, d in windows if d == "prose")
        flip |= in_math & (rng.random(p) < damage_math)
        kl[in_math] += damage_math / 2
    top1_q = np.where(flip, (top1_b + 1) % VOCAB, top1_b)
    nll_b = rng.exponential(3.0, size=p)
    base = {"nll": nll_b, "top1": top1_b, "top1_logp": np.log(rng.uniform(0.3, 1.0, size=p))}
    cand = {"nll": nll_b + kl, "kl": kl, "top1": top1_q}
    return positions_from(ids, windows, ["prose", "math"], base, cand)


def _measured(answers_right: int = 30, lost: int = 0) -> tuple[dict, dict]:
    asks = [{"prompt": f"q{i}", "expected": "a", "kind": "fact"} for i in range(40)]
    base = [{**a, "text": " a" if i < answers_right else " b", "p_first": 0.9} for i, a in enumerate(asks)]
    cand = [{**a, "text": " c" if i < lost else b["text"]} for i, (a, b) in enumerate(zip(asks, base))]
    gens = [{"prompt": "p", "token_ids": [1, 2, 3], "text": "x"}]
    return ({"answers": base, "generations": gens}, {"answers": cand, "generations": gens})


def test_consistency_locates_first_divergence():
    c = consistency([{"prompt": "a", "token_ids": [1, 2, 3, 4], "text": ""}, {"prompt": "b", "token_ids": [5, 6, 7, 8],
                     "text": ""}], [{"prompt": "a", "token_ids": [1, 2, 9, 9], "text": ""},
                                    {"prompt": "b", "token_ids": [5, 6, 7, 8], "text": ""}])
    assert c["exact_match_rate"] == 0.5 and c["token_agreement"] == pytest.approx(6 / 8)
    assert [p["first_divergence"] for p in c["per_prompt"]] == [2, None]


def test_top1_agreement():
    assert top1_agreement([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    with pytest.raises(ValueError):
        top1_agreement([1, 2], [1])


def test_slices_and_blocks():
    pos = _positions()
    masks = slice_masks(pos, _classes())
    assert set(masks) >= {"all", "domain:prose", "domain:math", "class:digits", "class:rare"}
    assert masks["domain:prose"].sum() + masks["domain:math"].sum() == len(pos.target)
    assert pos.blocks == 12 * -(-511 // BLOCK)  # 12 windows of 511 positions, blocks never cross a window


def test_sound_model_passes_every_check():
    base, cand = _measured()
    checks, side = run_checks(base, cand, Tolerances(), _positions(), _classes(), [])
    bad = [(c.name, c.verdict, c.note) for c in checks if c.verdict != "PASS"]
    # the synthetic data have no digits-free hole: every check decides, and passes
    assert not bad, bad
    assert overall_verdict(checks) == "PASS"
    assert all(c.low is not None and c.low <= c.estimate <= c.high and c.detectable is not None for c in checks)


def test_damage_confined_to_digits_fails_the_digit_slice_only_there():
    base, cand = _measured()
    checks, _ = run_checks(base, cand, Tolerances(), _positions(damage_digits=0.6), _classes(), [])
    by = {c.name: c for c in checks}
    assert by["kl:class:digits"].verdict == "FAIL" and by["top1:class:digits"].verdict == "FAIL"
    assert by["kl:class:operators"].verdict == "PASS"
    assert by["kl_divergence"].verdict == "PASS"  # the overall mean hides it: that is why slices exist
    assert overall_verdict(checks) == "FAIL"


def test_small_damage_concentrated_in_one_slice_fails_its_excess_check():
    # digits are rare (3 of 64 ids) and damaged a little: the absolute slice limit is not crossed,
    # but the slice carries far more than its share of the (small) overall error
    global DIGITS
    saved, DIGITS = DIGITS, [10, 11, 12]
    try:
        classes = _classes()
        classes["digits"][:] = False
        classes["digits"][DIGITS] = True
        base, cand = _measured()
        checks, _ = run_checks(base, cand, Tolerances(), _positions(damage_digits=0.15, seed=3, n=12288), classes, [])
    finally:
        DIGITS = saved
    by = {c.name: c for c in checks}
    assert by["kl:class:digits"].verdict == "PASS" and by["kl_divergence"].verdict == "PASS"
    assert by["kl_excess:class:digits"].verdict == "FAIL", by["kl_excess:class:digits"]
    assert by["kl_excess:domain:prose"].verdict == "PASS"


def test_missing_measurements_are_inconclusive_and_named():
    base, cand = _measured()
    checks, _ = run_checks(base, {**cand, "answers": None}, Tolerances(), None, None, ["qp_piqa"],
                           missing="no KL against the baseline reference")
    by = {c.name: c for c in checks}
    assert by["kl_divergence"].verdict == "INCONCLUSIVE" and "no KL" in by["kl_divergence"].note
    assert by["answers:fact"].verdict == "INCONCLUSIVE" and "quantized" in by["answers:fact"].note
    assert by["task:qp_piqa"].verdict == "INCONCLUSIVE" and "no qp_piqa results" in by["task:qp_piqa"].note
    assert overall_verdict(checks) == "INCONCLUSIVE"


def test_known_answers_lost_fail():
    base, cand = _measured(answers_right=30, lost=15)
    checks, side = run_checks(base, cand, Tolerances(), _positions(), _classes(), [])
    by = {c.name: c for c in checks}
    assert by["answers:fact"].verdict == "FAIL" and side["answers"]["kinds"]["fact"] == {"known": 30, "lost": 15,
                                                                                          "prompts": 40}


def _task(score_items: list[float], chance: float) -> dict:
    return {"score": sum(score_items) / len(score_items), "metric": "acc", "n": len(score_items),
            "category": "c", "chance": chance, "per_item": score_items}


def test_task_checks_decide_with_paired_intervals_and_exclude_sets_at_chance():
    base, cand = _measured()
    strong = [1.0] * 160 + [0.0] * 40
    b_acc = {"tasks": {"good": _task(strong, 0.5), "chance": _task([1.0] * 25 + [0.0] * 75, 0.25)}}
    q_same = {"tasks": {"good": _task(strong, 0.5), "chance": _task([0.0] * 100, 0.25)}}
    q_worse = {"tasks": {"good": _task([0.0] * 60 + strong[60:], 0.5), "chance": _task([0.0] * 100, 0.25)}}
    checks, side = run_checks({**base, "accuracy": b_acc}, {**cand, "accuracy": q_same}, Tolerances(), _positions(),
                              _classes(), ["good", "chance"])
    by = {c.name: c for c in checks}
    assert by["task:good"].verdict == "PASS" and "task:chance" not in by
    assert side["excluded"][0]["name"] == "task:chance" and "chance" in side["excluded"][0]["reason"]
    checks, _ = run_checks({**base, "accuracy": b_acc}, {**cand, "accuracy": q_worse}, Tolerances(), _positions(),
                           _classes(), ["good", "chance"])
    assert {c.name: c for c in checks}["task:good"].verdict == "FAIL"
    few = {"tasks": {"good": _task([1.0] * 14 + [0.0] * 6, 0.5)}}
    checks, _ = run_checks({**base, "accuracy": few}, {**cand, "accuracy": few}, Tolerances(task_drop_pct=5),
                           _positions(), _classes(), ["good"])
    assert {c.name: c for c in checks}["task:good"].verdict == "INCONCLUSIVE"  # 20 items cannot show <= 5 points
    low = {"tasks": {"weak": _task([1.0] * 10 + [0.0] * 90, 0.0)}}  # 0.10 above chance 0: could lose it all
    checks, side = run_checks({**base, "accuracy": low}, {**cand, "accuracy": low}, Tolerances(), _positions(),
                              _classes(), ["weak"])
    assert "task:weak" not in {c.name for c in checks} and side["excluded"][0]["name"] == "task:weak"


def test_check_limits_override_one_slice():
    base, cand = _measured()
    tol = Tolerances(check_limits={"kl:domain:math": 0.001})
    checks, _ = run_checks(base, cand, tol, _positions(), _classes(), [])
    by = {c.name: c for c in checks}
    assert by["kl:domain:math"].verdict == "FAIL" and by["kl:domain:prose"].verdict == "PASS"


def test_token_class_table_on_the_real_tokenizer(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok("The year 1969 (x + y) = 3\n\n    return", add_special_tokens=False)["input_ids"]
    table = token_class_table(tok, ids)
    pieces = {c: {tok.decode([i]) for i in ids if table[c][i]} for c in table}
    assert {"1", "9", "6", "3"} <= {p.strip() for p in pieces["digits"]}
    assert {"(", "+", ")", "="} <= {p.strip() for p in pieces["operators"]}
    assert any(not p.strip() for p in pieces["whitespace"])
    assert table["special"][tok.eos_token_id] and not table["rare"][tok.eos_token_id]
    assert table["rare"][ids[0]]  # seen once in the reference: rare


def test_only_answers_the_baseline_knows_confidently_count():
    from quantpipe.validation.answers import answer_flips, answer_prompts, first_answer

    assert first_answer(" 12\n3 + 4 = 7") == "12" and first_answer(" Paris, the city") == "paris"
    asks = answer_prompts()
    assert len(asks) == len({a["prompt"] for a in asks}) and {a["kind"] for a in asks} == {"fact", "yesno", "number"}
    b = [{"prompt": "a", "kind": "fact", "expected": "x", "text": " x", "p_first": 0.9},
         {"prompt": "b", "kind": "fact", "expected": "y", "text": " y", "p_first": 0.2},  # right but unsure
         {"prompt": "c", "kind": "fact", "expected": "z", "text": " w", "p_first": 0.9}]  # wrong
    c = [{**r, "text": " q"} for r in b]
    flips = answer_flips(b, c)
    assert flips["flipped"] == 3 and flips["kinds"]["fact"] == {"known": 1, "lost": 1, "prompts": 3}


def test_one_domain_damaged_fails_its_excess_against_the_other_domains():
    """A domain's blocks hold only its own text: it is compared with the other domains, not
    with itself (which no damage could ever exceed)."""
    base, cand = _measured()
    checks, _ = run_checks(base, cand, Tolerances(), _positions(damage_math=0.1), _classes(), [])
    by = {c.name: c for c in checks}
    assert by["kl:domain:math"].verdict == "PASS"  # 0.07 nats: far under the absolute ceiling
    assert by["kl_excess:domain:math"].verdict == "FAIL", by["kl_excess:domain:math"]
    assert by["kl_excess:domain:prose"].verdict == "PASS"


def test_a_class_that_fills_its_text_is_not_its_own_reference():
    """Digits damaged where they make up most of the text: measured against the same blocks'
    other positions the concentration shows; measured against a mean that includes the
    damaged digits themselves, it would be diluted away."""
    global DIGITS
    saved, DIGITS = DIGITS, list(range(0, 40))  # 40 of 64 ids: most positions read or predict a digit
    try:
        classes = _classes()
        classes["digits"][:] = False
        classes["digits"][DIGITS] = True
        base, cand = _measured()
        pos = _positions(damage_digits=0.03, seed=5)
        checks, _ = run_checks(base, cand, Tolerances(), pos, classes, [])
    finally:
        DIGITS = saved
    by = {c.name: c for c in checks}
    share = slice_masks(pos, classes)["class:digits"].mean()
    assert share > 0.8, share
    assert by["kl_excess:class:digits"].verdict == "FAIL", by["kl_excess:class:digits"]


def test_yes_no_questions_are_balanced_and_a_swapped_answer_pair_loses_them_all():
    from quantpipe.validation.answers import answer_flips, answer_prompts, first_answer

    asks = [a for a in answer_prompts() if a["kind"] == "yesno"]
    assert len(asks) >= 40 and sum(a["expected"] == "yes" for a in asks) == len(asks) // 2
    assert len({a["prompt"] for a in asks}) == len(asks)
    assert first_answer(" Yes, it is.\nQ: next") == "yes"
    base = [{**a, "text": " " + a["expected"], "p_first": 0.9} for a in asks]
    swapped = [{**a, "text": " no" if a["expected"] == "yes" else " yes"} for a in asks]
    k = answer_flips(base, swapped)["kinds"]["yesno"]
    assert k["known"] == len(asks) and k["lost"] == len(asks)


def test_answer_prompts_share_few_shot_batches():
    """Answer prompts are decoded one batch per few-shot block (the engine computes a batch's shared
    prefix once): the yes/no questions, whose own line is followed by "A:", share theirs too."""
    from quantpipe.validation.answers import answer_prompts
    from quantpipe.validation.metrics import few_shot_prefix

    asks = answer_prompts()
    groups = {few_shot_prefix(a["prompt"]) for a in asks}
    assert len(groups) <= 6, len(groups)
    yesno = [a["prompt"] for a in asks if a["kind"] == "yesno"]
    assert len({few_shot_prefix(p) for p in yesno}) == 1 and few_shot_prefix(yesno[0]).startswith("Q: Is the sun hot?")
    assert few_shot_prefix("The capital of France is") == ""
    assert few_shot_prefix("2 + 2 = 4\n3 + 5 = 8\n7 + 1 =") == "2 + 2 = 4\n3 + 5 = 8"
