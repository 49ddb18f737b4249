import pytest

from quantpipe.quantization.recipes import build_recipe
from quantpipe.settings import QuantSettings


def _names(recipe):
    return [type(m).__name__ for m in recipe]


def test_gptq_recipe_uses_the_group_size_and_keeps_lm_head():
    (m,) = build_recipe(QuantSettings(method="gptq", bits=4, group_size=96))
    assert type(m).__name__ == "GPTQModifier"
    scheme = m.config_groups["group_0"]
    w = scheme.weights
    # the default 4-bit GPTQ recipe: zero point per group, MSE scale search
    assert (w.num_bits, w.group_size, w.symmetric, w.observer) == (4, 96, False, "mse")
    assert scheme.input_activations is None
    assert m.ignore == ["lm_head"]


def test_gptq_symmetric_minmax_on_request():
    (m,) = build_recipe(QuantSettings(method="gptq", bits=4, symmetric=True, observer="minmax"))
    w = m.config_groups["group_0"].weights
    assert (w.symmetric, w.observer) == (True, "minmax")


def test_awq_is_asymmetric_4bit_with_a_quantization_modifier():
    recipe = build_recipe(QuantSettings(method="awq", bits=4, group_size=32))
    assert _names(recipe) == ["AWQModifier", "QuantizationModifier"]
    w = recipe[1].config_groups["group_0"].weights
    assert (w.num_bits, w.symmetric, w.group_size) == (4, False, 32)


@pytest.mark.parametrize("method,names", [("fp8", ["QuantizationModifier"]),
                                          ("w8a8", ["SmoothQuantModifier", "GPTQModifier"])])
def test_8bit_recipes(method, names):
    recipe = build_recipe(QuantSettings(method=method, bits=8))
    assert _names(recipe) == names
    assert recipe[-1].ignore == ["lm_head"]
