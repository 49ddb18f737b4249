import pytest

torch = pytest.importorskip("torch")


def _tiny_pair():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).eval()
    quant = LlamaForCausalLM(cfg).eval()
    quant.load_state_dict(base.state_dict())
    for name, mod in quant.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            mod.quantization_scheme = object()  # what compressed-tensors attaches
            with torch.no_grad():
                mod.weight.add_(torch.randn_like(mod.weight) * 1e-4)
    with torch.no_grad():
        quant.model.layers[1].mlp.down_proj.weight.mul_(-3.0)  # the planted bad layer
    return base, quant


def test_sensitivity_ranks_the_broken_layer_first_and_restores_weights():
    from quantpipe.validation.sensitivity import layer_errors, most_sensitive, sensitivity

    base, quant = _tiny_pair()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    errs = layer_errors(base, quant)
    assert errs[0]["layer"] == "model.layers.1.mlp.down_proj" and errs[0]["rel_error"] > 1
    assert "lm_head" not in {e["layer"] for e in errs}
    ids = torch.randint(0, 64, (96,)).tolist()
    sens = sensitivity(base, quant, ids, window=32, probe=3)
    assert most_sensitive(sens, 1) == ["model.layers.1.mlp.down_proj"]
    assert sens["layers"][0]["loss_delta"] > sens["layers"][1]["loss_delta"]
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_kl_against_reference_is_zero_for_the_same_model_and_positive_otherwise():
    from quantpipe.validation.metrics import perplexity

    base, quant = _tiny_pair()
    ids = torch.randint(0, 64, (64,)).tolist()
    ref = perplexity(base, ids, 32)
    same = perplexity(base, ids, 32, reference=ref["dist"])
    other = perplexity(quant, ids, 32, reference=ref["dist"])
    assert same["kl"]["mean"] < 1e-3
    assert other["kl"]["mean"] > 10 * max(same["kl"]["mean"], 1e-6)
