"""The exact comparison of the tensors a recipe keeps in full precision (``validation.untouched``)
and its check: synthetic checkpoints of a few small tensors, named as in a Llama model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from quantpipe.validation.checks import artifact_checks
from quantpipe.validation.untouched import compare_untouched

VOCAB, HIDDEN = 64, 16
FP8 = "QuantizationModifier:\n  scheme: FP8_DYNAMIC\n"  # a recipe without smoothing


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g).to(torch.bfloat16),
        "model.layers.0.input_layernorm.weight": (1 + 0.1 * torch.randn(HIDDEN, generator=g)).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(HIDDEN, HIDDEN, generator=g).to(torch.bfloat16),
        "model.norm.weight": (1 + 0.1 * torch.randn(HIDDEN, generator=g)).to(torch.bfloat16),
    }


def _folder(path: Path, tensors: dict, quantized: bool = False, recipe: str | None = None) -> Path:
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    config = {"model_type": "llama"} | ({"quantization_config": {"format": "int-quantized"}} if quantized else {})
    (path / "config.json").write_text(json.dumps(config))
    if recipe is not None:
        (path / "recipe.yaml").write_text(recipe)
    return path


class _Tok:
    def convert_ids_to_tokens(self, i: int) -> str:
        return f"tok{i}"


@pytest.fixture()
def baseline(tmp_path):
    return _folder(tmp_path / "base", _tensors())


def _dense(tensors: dict) -> dict:
    """The state dict evaluation holds: float32 on the CPU."""
    return {k: v.float() for k, v in tensors.items()}


def test_a_copy_changes_nothing_and_passes(baseline, tmp_path):
    t = _tensors()
    res = compare_untouched(baseline, _folder(tmp_path / "c", t, recipe=FP8), _dense(t), _Tok())
    assert res.changed_rows == 0 and res.rows == VOCAB + HIDDEN + 1 + 1
    assert len(res.compared) == 4 and not res.exempt
    check = artifact_checks(res, {"tokenizer": [], "generation": [], "config": []})[0]
    assert check.name == "weights:untouched" and check.verdict == "PASS"
    assert check.low == check.high == 0 and check.detectable == 0


def test_rows_written_to_the_wrong_index_fail_and_name_their_tokens(baseline, tmp_path):
    t = _tensors()
    w = t["model.embed_tokens.weight"]
    ids = [10, 11, 12]
    w[ids] = w[[11, 12, 10]].clone()
    res = compare_untouched(baseline, _folder(tmp_path / "c", t), _dense(t), _Tok())
    assert res.changed_rows == 3
    change = res.changes[0]
    assert change.tensor == "model.embed_tokens.weight" and change.tokens == ["tok10", "tok11", "tok12"]
    check = artifact_checks(res, {})[0]
    assert check.verdict == "FAIL" and check.estimate == 3
    assert "tok10" in check.note and "3 of 64 rows" in check.note


def test_small_noise_on_a_few_rows_is_caught_but_storage_rounding_is_not(baseline, tmp_path):
    t = _tensors()
    e = t["model.embed_tokens.weight"]
    e[5] = (e[5].float() * 1.05).to(torch.bfloat16)  # 5 % on one row
    t["model.norm.weight"] = t["model.norm.weight"].to(torch.float16).to(torch.bfloat16)  # fp16 round trip
    t["model.layers.0.input_layernorm.weight"] = t["model.layers.0.input_layernorm.weight"].to(torch.float16).to(
        torch.bfloat16)
    res = compare_untouched(baseline, _folder(tmp_path / "c", t, recipe=FP8), _dense(t), _Tok())
    assert res.changed_rows == 1 and res.changes[0].tokens == ["tok5"]


def test_quantized_modules_and_smoothed_norms_are_exempt_the_rest_is_not(baseline, tmp_path):
    t = _tensors()
    t["model.layers.0.self_attn.q_proj.weight"] *= 1.3  # quantized: its error is the divergence checks' job
    t["model.layers.0.input_layernorm.weight"] *= 0.5  # smoothed by SmoothQuant
    t["model.norm.weight"] *= 0.5  # never touched by any recipe
    stored = {**t, "model.layers.0.self_attn.q_proj.weight_scale": torch.ones(HIDDEN, 1)}
    cand = _folder(tmp_path / "c", stored, quantized=True, recipe="SmoothQuantModifier:\n  smoothing_strength: 0.8\n")
    res = compare_untouched(baseline, cand, _dense(t), _Tok())
    assert set(res.exempt) == {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.input_layernorm.weight"}
    assert [c.tensor for c in res.changes] == ["model.norm.weight"]


def test_without_smoothing_in_the_recipe_a_layer_norm_change_fails(baseline, tmp_path):
    t = _tensors()
    t["model.layers.0.input_layernorm.weight"] *= 0.5
    stored = {**t, "model.layers.0.self_attn.q_proj.weight_scale": torch.ones(HIDDEN, 1)}
    cand = _folder(tmp_path / "c", stored, quantized=True, recipe=FP8)
    res = compare_untouched(baseline, cand, _dense(t), _Tok())
    assert [c.tensor for c in res.changes] == ["model.layers.0.input_layernorm.weight"]


def test_without_a_recipe_the_blocks_are_exempt_and_what_lies_outside_them_is_not(baseline, tmp_path):
    """A plain folder may hold weights fake-quantized in place: nothing says what was done
    inside the blocks, so only the embeddings, output head and final norm are held exact."""
    t = _tensors()
    t["model.layers.0.self_attn.q_proj.weight"][::4] *= 3.0
    t["model.layers.0.input_layernorm.weight"] *= 0.5
    t["model.embed_tokens.weight"][7] *= 0.05
    res = compare_untouched(baseline, _folder(tmp_path / "c", t), _dense(t), _Tok())
    assert set(res.exempt) == {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.input_layernorm.weight"}
    assert all("no recipe.yaml" in why for why in res.exempt.values())
    assert [(c.tensor, c.changed, c.tokens) for c in res.changes] == [("model.embed_tokens.weight", 1, ["tok7"])]


def test_a_missing_tensor_is_a_change_not_a_skip(baseline, tmp_path):
    t = _tensors()
    state = _dense(t)
    del state["model.norm.weight"]
    res = compare_untouched(baseline, _folder(tmp_path / "c", t), state, _Tok())
    assert res.changes and res.changes[0].missing and res.changed_rows == 1
    assert artifact_checks(res, {})[0].verdict == "FAIL"


def test_not_compared_is_inconclusive_and_names_why():
    checks = artifact_checks(None, None, missing="the candidate could not be loaded")
    assert {c.name for c in checks} == {"weights:untouched", "files:tokenizer", "files:generation", "files:config"}
    assert all(c.verdict == "INCONCLUSIVE" and "could not be loaded" in c.note for c in checks)
