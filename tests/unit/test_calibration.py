import json

import pytest

from quantpipe.artifacts import ArtifactStore, uri_to_path
from quantpipe.calibration.dataset import (build_calibration_set, load_samples, read_jsonl_texts,
                                           sample_and_tokenize, validate_samples)
from quantpipe.errors import CalibrationError
from quantpipe.settings import CalibrationSettings

S = CalibrationSettings(num_samples=8, max_seq_length=64, min_tokens=16)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_real_set_is_seeded_bounded_and_stored(tmp_path, corpus_dir, model_dir):
    store = ArtifactStore(tmp_path)
    a = build_calibration_set(store, corpus_dir / "calibration.jsonl", model_dir, 49152, S)
    b = build_calibration_set(store, corpus_dir / "calibration.jsonl", model_dir, 49152, S)
    assert not a.reused and b.reused and a.key == b.key
    rows = load_samples(uri_to_path(a.uri))
    assert len(rows) == 8 and all(16 <= len(r) <= 64 for r in rows)
    assert all(0 <= t < 49152 for r in rows for t in r)
    other = build_calibration_set(store, corpus_dir / "calibration.jsonl", model_dir, 49152,
                                  S.model_copy(update={"seed": 1}))
    assert load_samples(uri_to_path(other.uri)) != rows


def test_out_of_vocabulary_ids_refused():
    with pytest.raises(CalibrationError, match=r"21 token ids outside the vocabulary \[0, 100\); first: id 480 in sample 1"):
        validate_samples([list(range(20)), list(range(480, 501))], 100, S)


def test_empty_and_short_corpora_refused(tokenizer, tmp_path):
    with pytest.raises(CalibrationError, match="empty"):
        sample_and_tokenize([], tokenizer, S)
    with pytest.raises(CalibrationError, match=r"only 0 of 3 texts have at least 16 tokens"):
        sample_and_tokenize(["hi", "short one", "tiny"], tokenizer, S)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(CalibrationError, match="is empty"):
        read_jsonl_texts(empty)


def test_bad_jsonl_lines_named(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "ok"}) + "\n{broken\n")
    with pytest.raises(CalibrationError, match=r"d.jsonl:2: not valid JSON"):
        read_jsonl_texts(f)
    f.write_text(json.dumps({"body": "no text field"}) + "\n")
    with pytest.raises(CalibrationError, match=r"d.jsonl:1: each line needs a non-empty string field 'text'"):
        read_jsonl_texts(f)
    with pytest.raises(CalibrationError, match="does not exist"):
        read_jsonl_texts(tmp_path / "missing.jsonl")


def test_low_diversity_refused():
    rows = [[7] * 40 for _ in range(8)]
    with pytest.raises(CalibrationError, match="not diverse"):
        validate_samples(rows, 100, S)
