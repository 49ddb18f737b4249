from quantpipe.assets.corpus import read_texts, split_passages


def test_split_dedupes_and_never_overlaps():
    calib, held = split_passages([f"passage {i}" for i in range(200)] + ["passage 3", "  passage   3 "])
    assert len(calib) + len(held) == 200
    assert not set(calib) & set(held)
    assert 5 < len(held) < 40


def test_builtin_corpus_parts_are_disjoint(corpus_dir):
    calib = read_texts(corpus_dir / "calibration.jsonl")
    held = read_texts(corpus_dir / "heldout.jsonl")
    assert len(calib) > 10_000 and len(held) > 1_000
    assert not set(calib) & set(held)
