"""The files served beside the weights, against the baseline's (``validation.companions``), on
copies of the real small model's tokenizer and config files (no weights needed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from quantpipe.validation.checks import artifact_checks
from quantpipe.validation.companions import companion_differences


@pytest.fixture()
def files(model_dir, tmp_path) -> tuple[Path, Path]:
    base, cand = tmp_path / "base", tmp_path / "cand"
    for d in (base, cand):
        shutil.copytree(model_dir, d, ignore=shutil.ignore_patterns("*.safetensors", "MANIFEST.json"))
    return base, cand


def _diffs(base: Path, cand: Path) -> dict[str, list[str]]:
    return companion_differences(base, cand, AutoTokenizer.from_pretrained(cand))


def _edit(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=2))


def test_a_copy_with_a_quantization_config_has_no_difference(files):
    base, cand = files
    _edit(cand / "config.json", quantization_config={"quant_method": "compressed-tensors"},
          transformers_version="0.0.0")
    assert _diffs(base, cand) == {"tokenizer": [], "generation": [], "config": []}
    checks = artifact_checks(None, _diffs(base, cand))
    assert [c.verdict for c in checks if c.group == "files"] == ["PASS"] * 3


def test_a_changed_end_of_sequence_id_fails_generation(files):
    base, cand = files
    gen = json.loads((base / "generation_config.json").read_text())
    _edit(cand / "generation_config.json", eos_token_id=7)
    diffs = _diffs(base, cand)
    assert len(diffs["generation"]) == 1 and "eos_token_id" in diffs["generation"][0], diffs
    assert json.dumps(gen.get("eos_token_id")) in diffs["generation"][0]
    check = next(c for c in artifact_checks(None, diffs) if c.name == "files:generation")
    assert check.verdict == "FAIL" and "eos_token_id" in check.note


def test_generation_defaults_missing_on_either_side_are_derived_from_the_config(files):
    """A checkpoint without generation_config.json gets one derived from its config when it is
    saved: that is not a difference; sampling defaults that the file set and the candidate lost are."""
    base, cand = files
    (base / "generation_config.json").unlink()
    assert _diffs(base, cand)["generation"] == []
    (cand / "generation_config.json").unlink()
    assert _diffs(base, cand)["generation"] == []
    _edit(cand / "config.json", eos_token_id=7)  # what the server derives its end-of-sequence from
    assert any("eos_token_id" in d for d in _diffs(base, cand)["generation"])


def test_sampling_defaults_the_candidate_lost_fail(files):
    base, cand = files
    _edit(base / "generation_config.json", temperature=0.6, top_p=0.9, do_sample=True)
    diffs = _diffs(base, cand)["generation"]
    assert {d.split(":")[0] for d in diffs} >= {"generation defaults temperature", "generation defaults top_p"}, diffs


def test_an_edited_chat_template_fails_tokenizer(files):
    base, cand = files
    tmpl = next(p for p in (cand / "chat_template.jinja", cand / "tokenizer_config.json") if p.exists())
    if tmpl.suffix == ".jinja":
        tmpl.write_text(tmpl.read_text().replace("<|im_end|>", "<|im_end|>\n\n", 1))
    else:
        data = json.loads(tmpl.read_text())
        data["chat_template"] = data["chat_template"].replace("<|im_end|>", "<|im_end|>\n\n", 1)
        tmpl.write_text(json.dumps(data))
    diffs = _diffs(base, cand)["tokenizer"]
    assert any(d.startswith("tokenizer chat template") for d in diffs), diffs


def test_a_changed_special_token_fails_tokenizer(files):
    base, cand = files
    _edit(cand / "tokenizer_config.json", eos_token="<|endoftext|>")
    diffs = _diffs(base, cand)["tokenizer"]
    assert any("special token" in d for d in diffs), diffs


def test_a_changed_rotary_base_or_context_length_fails_config(files):
    base, cand = files
    cfg = json.loads((base / "config.json").read_text())
    rope = {**cfg["rope_parameters"], "rope_theta": cfg["rope_parameters"]["rope_theta"] * 4}
    _edit(cand / "config.json", rope_parameters=rope, max_position_embeddings=cfg["max_position_embeddings"] // 2)
    diffs = _diffs(base, cand)["config"]
    assert any("max_position_embeddings" in d for d in diffs), diffs
    assert any("rope" in d for d in diffs), diffs
    assert len(diffs) == 2, diffs  # each field once, though both comparisons see it


def test_a_value_only_the_server_reads_counts_when_both_files_set_it(files):
    base, cand = files
    _edit(base / "config.json", sliding_window_hint=4096)
    _edit(cand / "config.json", sliding_window_hint=1024)
    assert any("sliding_window_hint" in d for d in _diffs(base, cand)["config"])


def test_fields_moved_by_a_resave_with_another_version_are_no_difference(files):
    """A baseline written by an older transformers (top-level rope_theta, torch_dtype); the
    candidate re-saved by this one (rope_parameters, dtype): the same model."""
    base, cand = files
    data = json.loads((base / "config.json").read_text())
    theta = data.pop("rope_parameters")["rope_theta"]
    data.pop("dtype", None)
    data.update(rope_theta=theta, torch_dtype="bfloat16")
    (base / "config.json").write_text(json.dumps(data))
    assert _diffs(base, cand)["config"] == []


def test_an_unreadable_file_is_a_difference_that_names_the_error(files):
    base, cand = files
    (cand / "config.json").write_text("{not json")
    diffs = companion_differences(base, cand, AutoTokenizer.from_pretrained(base))["config"]
    assert len(diffs) == 1 and diffs[0].startswith("cannot be compared")
    assert next(c for c in artifact_checks(None, {"config": diffs}) if c.name == "files:config").verdict == "FAIL"
