"""quantpipe.scheduling: entries, fingerprints, skip decisions, watched-directory scans."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantpipe.hashing import sha256_file, sha256_json
from quantpipe.scheduling import (DEFAULT_ENTRIES, PlanError, RequantState, checkpoint_asset_uri, checkpoint_hash,
                                  entries_for_checkpoints, entry_key, fingerprint, load_entries, plan,
                                  scan_checkpoints)


def _ckpt(folder: Path, weights: bytes = b"w" * 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_default_entries_without_variable_or_yaml(tmp_path):
    assert load_entries(None, tmp_path / "missing.yaml") == DEFAULT_ENTRIES


def test_variable_wins_over_yaml(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("entries:\n  - {method: gptq, bits: 4, run_name: a}\n")
    assert load_entries(None, y) == [{"method": "gptq", "bits": 4, "run_name": "a"}]
    assert load_entries('[{"method": "w8a8", "bits": 8, "run_name": "b"}]', y)[0]["method"] == "w8a8"


@pytest.mark.parametrize("raw, match", [
    ("not json", "not valid JSON"),
    ("[]", "non-empty list"),
    ('["x"]', "expected a dict"),
    ('[{"method": "awq", "bits": 8}]', "does not support 8-bit"),
    ('[{"run_name": "a"}, {"run_name": "a"}]', "duplicate entries"),
])
def test_bad_lists_are_refused_with_the_reason(raw, match):
    with pytest.raises(PlanError, match=match):
        load_entries(raw)


def test_checkpoint_hash_matches_prep_and_uses_the_cache(tmp_path):
    ck = _ckpt(tmp_path / "m")
    expected = sha256_json({p.name: sha256_file(p) for p in sorted(ck.iterdir())})
    cache: dict = {}
    assert checkpoint_hash(ck, cache) == expected
    assert len(cache) == 2
    # a cached digest is reused while size and mtime are unchanged
    key = str((ck / "model.safetensors").resolve())
    cache[key][2] = "0" * 64
    assert checkpoint_hash(ck, cache) != expected
    (ck / "model.safetensors").write_bytes(b"v" * 65)
    assert checkpoint_hash(ck, cache) not in (expected,)


def test_fingerprint_depends_on_checkpoint_and_resolved_settings():
    e = {"method": "fp8", "bits": 8}
    assert fingerprint("a", e) == fingerprint("a", {**e, "run_name": "other"})  # label only
    assert fingerprint("a", e) == fingerprint("a", {**e, "calibration_samples": 32})  # the default
    assert fingerprint("a", e) != fingerprint("b", e)
    assert fingerprint("a", e) != fingerprint("a", {**e, "calibration_samples": 64})


def test_plan_skips_only_after_a_successful_run_with_the_same_inputs(tmp_path):
    ck = _ckpt(tmp_path / "m")
    entry = {"model_uri": str(ck), "method": "fp8", "bits": 8, "run_name": "m-fp8"}
    state = RequantState.load(tmp_path / "store")
    [d] = plan([entry], state, Path)
    assert d.run and d.reason == "no successful run recorded"
    state.mark_triggered(d.key, d.fingerprint, "r1")
    state.mark_result(d.key, d.fingerprint, "r1", "failed")
    state.save()
    state = RequantState.load(tmp_path / "store")
    assert plan([entry], state, Path)[0].run  # a failed run does not count
    state.mark_result(d.key, d.fingerprint, "r2", "success")
    state.save()
    state = RequantState.load(tmp_path / "store")
    [d2] = plan([entry], state, Path)
    assert not d2.run and "r2" in d2.reason
    assert plan([entry], state, Path, force=True)[0].run
    assert plan([{**entry, "max_seq_length": 128}], state, Path)[0].run  # settings changed
    (ck / "model.safetensors").write_bytes(b"new weights")
    [d3] = plan([entry], state, Path)
    assert d3.run and "changed" in d3.reason


def test_unreadable_state_says_how_to_recover(tmp_path):
    p = tmp_path / "scheduling" / "requantize_state.json"
    p.parent.mkdir()
    p.write_text("{")
    with pytest.raises(PlanError, match="delete it"):
        RequantState.load(tmp_path)


def test_entry_key_is_stable_and_file_safe():
    k = entry_key({"model_uri": "file:///data/ckpts/My Model/", "method": "gptq", "bits": 4})
    assert k == entry_key({"model_uri": "file:///data/ckpts/My Model/", "method": "gptq", "bits": 4})
    assert k.startswith("My_Model-gptq4-") and "/" not in k


def test_scan_reports_new_and_changed_folders_once(tmp_path):
    watch, root = tmp_path / "watch", tmp_path / "store"
    _ckpt(watch / "a")
    (watch / "b.partial").mkdir(parents=True)  # still uploading
    (watch / "notes").mkdir()  # not a checkpoint
    hashes, changed = scan_checkpoints(watch, root)
    assert list(hashes) == ["a"] and changed == ["a"]
    assert scan_checkpoints(watch, root)[1] == []
    _ckpt(watch / "b")
    assert scan_checkpoints(watch, root)[1] == ["b"]
    (watch / "a" / "model.safetensors").write_bytes(b"retrained")
    assert scan_checkpoints(watch, root)[1] == ["a"]
    assert scan_checkpoints(tmp_path / "absent", tmp_path / "store2") == ({}, [])


def test_entries_for_checkpoints(tmp_path):
    out = entries_for_checkpoints([{"name": "m1", "path": str(tmp_path / "m1")}],
                                  [{"method": "fp8", "bits": 8}, {"method": "gptq", "bits": 4}])
    assert [e["run_name"] for e in out] == ["m1-fp8-8bit", "m1-gptq-4bit"]
    assert out[0]["model_uri"] == (tmp_path / "m1").resolve().as_uri()
    with pytest.raises(PlanError):
        entries_for_checkpoints([{"name": "../x", "path": "/x"}])
    assert checkpoint_asset_uri("m1") == "quantpipe://checkpoints/m1"
