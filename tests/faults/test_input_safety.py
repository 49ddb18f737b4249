"""Checkpoints and calibration data load without executing code shipped with them."""

from __future__ import annotations

import json
import shutil

import pytest

from quantpipe.errors import CheckpointError
from quantpipe.prep.checkpoint import verify_checkpoint


@pytest.fixture()
def booby_trapped(model_dir, tmp_path):
    """The real model plus remote code that would leave a marker if it ever ran, and a pickle."""
    ckpt = tmp_path / "trapped"
    shutil.copytree(model_dir, ckpt, ignore=shutil.ignore_patterns("MANIFEST.json"))
    marker = tmp_path / "code-ran"
    (ckpt / "evil_modeling.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                           "from transformers import LlamaForCausalLM as EvilModel\n")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil_modeling.EvilModel"}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    import pickle

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    return ckpt, marker


def test_model_load_never_runs_checkpoint_code_or_pickles(booby_trapped):
    from quantpipe.validation.metrics import load_model

    ckpt, marker = booby_trapped
    verify_checkpoint(ckpt)  # safetensors present: verified from headers only
    try:
        model, _ = load_model(ckpt)
        assert type(model).__name__ == "LlamaForCausalLM"
    except ValueError as e:  # transformers may refuse auto_map without trust_remote_code: also safe
        assert "trust_remote_code" in str(e)
    assert not marker.exists(), "code shipped with the checkpoint was executed"


def test_pickle_only_checkpoint_is_refused(booby_trapped, tmp_path):
    ckpt, marker = booby_trapped
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="pickle weights are refused"):
        verify_checkpoint(ckpt)
    assert not marker.exists()


def test_calibration_sets_are_json_not_pickle(tmp_path):
    from quantpipe.calibration.dataset import load_samples

    (tmp_path / "samples.jsonl").write_text("[1, 2, 3]\n[4, 5]\n")
    assert load_samples(tmp_path) == [[1, 2, 3], [4, 5]]
    (tmp_path / "samples.jsonl").write_bytes(b"\x80\x04\x95pickled")
    with pytest.raises(ValueError):
        load_samples(tmp_path)
