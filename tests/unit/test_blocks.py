"""Each decoder block against the same block with the baseline's tensors (``validation.blocks``),
on a tiny random Llama saved as a real checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quantpipe.validation.blocks import block_errors
from quantpipe.validation.checks import block_check

LIMIT = 0.4


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


WINDOWS = [[(7 * k + 3 * j) % 96 for j in range(96)] for k in range(3)]


def test_the_baseline_itself_has_no_error_and_passes(baseline):
    model, folder = baseline
    res = block_errors(copy.deepcopy(model), folder, WINDOWS)
    assert len(res.errors) == 3 and max(res.errors) < 1e-5
    check = block_check(res, LIMIT)
    assert check.verdict == "PASS" and check.n == 3 * 95 and check.high < 0.01


def test_a_zeroed_block_fails_and_is_named(baseline):
    model, folder = baseline
    cand = copy.deepcopy(model)
    for p in cand.model.layers[1].mlp.parameters():
        p.data.zero_()
    for p in cand.model.layers[1].self_attn.parameters():
        p.data.zero_()
    res = block_errors(cand, folder, WINDOWS)
    assert res.errors[1] == pytest.approx(1.0, abs=1e-4) and res.errors[0] < 1e-5
    check = block_check(res, LIMIT)
    assert check.verdict == "FAIL" and check.low > LIMIT and "block 1: 1.000" in check.note


def test_smoothing_a_block_changes_nothing(baseline):
    """SmoothQuant's rescaling (norm divided by s, the linears it feeds multiplied by s per
    input column) keeps the block's function: no error."""
    model, folder = baseline
    cand = copy.deepcopy(model)
    layer = cand.model.layers[0]
    s = torch.linspace(0.5, 2.0, 64)
    layer.input_layernorm.weight.data /= s
    for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
        lin.weight.data *= s
    res = block_errors(cand, folder, WINDOWS)
    assert max(res.errors) < 1e-4


def test_noise_like_quantization_stays_below_the_limit_and_mis_scaled_rows_do_not(baseline):
    model, folder = baseline
    noisy, scaled = copy.deepcopy(model), copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    for name, p in noisy.named_parameters():
        if name.endswith("proj.weight"):  # ~4-bit rounding: a twentieth of each row's spread
            p.data += torch.randn(p.shape, generator=g) * p.data.std(1, keepdim=True) * 0.05
    for layer in scaled.model.layers:
        layer.mlp.down_proj.weight.data[::2] *= 4.0  # a wrong scale on half the output channels
    quiet, loud = block_errors(noisy, folder, WINDOWS), block_errors(scaled, folder, WINDOWS)
    assert 0 < max(quiet.errors) < 0.2 and block_check(quiet, LIMIT).verdict == "PASS"
    assert max(loud.errors) > 2 * LIMIT and block_check(loud, LIMIT).verdict == "FAIL"


def test_a_baseline_without_the_blocks_tensors_is_refused(baseline, tmp_path):
    model, _ = baseline
    other = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    other.save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(ValueError, match="lacks tensors of block 1"):
        block_errors(copy.deepcopy(model), tmp_path, WINDOWS)
    assert block_check(None, LIMIT, missing="x").verdict == "INCONCLUSIVE"
