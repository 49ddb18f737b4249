import pytest
from pydantic import ValidationError

from quantpipe.errors import PipelineError, QuantizationError
from quantpipe.pipeline import validate_params
from quantpipe.quantization.recipes import check_group_size
from quantpipe.settings import PipelineParams, QuantSettings
from quantpipe.store import Store


@pytest.mark.parametrize("method,bits,scheme", [("gptq", 4, "W4A16_ASYM"), ("gptq", 8, "W8A16"),
                                                ("awq", 4, "W4A16_ASYM"), ("fp8", 8, "FP8_DYNAMIC"),
                                                ("w8a8", 8, "W8A8")])
def test_schemes(method, bits, scheme):
    assert QuantSettings(method=method, bits=bits).scheme == scheme


def test_symmetric_gptq_and_form_fields():
    assert QuantSettings(method="gptq", bits=4, symmetric=True).scheme == "W4A16"
    p = validate_params({"method": "gptq", "bits": 4, "symmetric": True, "observer": "minmax"}, store=Store.local())
    assert (p["quant"]["symmetric"], p["quant"]["observer"]) == (True, "minmax")
    with pytest.raises(PipelineError, match="observer"):
        validate_params({"method": "gptq", "bits": 4, "observer": "percentile"}, store=Store.local())


@pytest.mark.parametrize("method,bits", [("fp8", 4), ("awq", 8), ("w8a8", 4), ("gptq", 3)])
def test_bad_combinations_are_refused_with_reason(method, bits):
    with pytest.raises(PipelineError, match=f"method '{method}' does not support {bits}-bit"):
        validate_params({"method": method, "bits": bits}, store=Store.local())


def test_unknown_method_refused():
    with pytest.raises(PipelineError, match="method"):
        validate_params({"method": "int3"}, store=Store.local())


@pytest.mark.parametrize("name", ["../etc", "a/b", ".hidden", "x" * 200, "a b"])
def test_run_name_refuses_paths(name):
    with pytest.raises(PipelineError, match="run_name"):
        validate_params({"run_name": name}, store=Store.local())


def test_from_flat_maps_every_form_field():
    p = PipelineParams.from_flat({"method": "gptq", "bits": 8, "group_size": 32, "calibration_samples": 8,
                                  "max_seq_length": 64, "seed": 3, "ppl_max_tokens": 512, "num_prompts": 2,
                                  "max_new_tokens": 4, "ppl_increase_pct": 1.5, "accuracy_drop_pct": 2,
                                  "min_top1_agreement": 0.9, "max_slice_kl": 0.3,
                                  "check_limits": {"kl:domain:code": 0.5}, "inconclusive": "review",
                                  "calibration_dataset": ""})
    assert (p.quant.bits, p.quant.group_size) == (8, 32)
    assert (p.calibration.num_samples, p.calibration.max_seq_length, p.calibration.seed) == (8, 64, 3)
    assert p.calibration.dataset_path is None
    assert (p.evaluation.ppl_max_tokens, p.evaluation.num_prompts, p.evaluation.max_new_tokens) == (512, 2, 4)
    assert p.tolerances.ppl_increase_pct == 1.5 and p.tolerances.min_top1_agreement == 0.9
    assert (p.tolerances.max_slice_kl, p.tolerances.check_limits, p.tolerances.inconclusive) == \
        (0.3, {"kl:domain:code": 0.5}, "review")


def test_out_of_range_values_refused():
    with pytest.raises(PipelineError, match="num_samples"):
        validate_params({"calibration_samples": 1}, store=Store.local())
    with pytest.raises(ValidationError):
        QuantSettings(method="gptq", bits=4, group_size=100)


def test_group_size_must_divide_layer_widths():
    check_group_size(QuantSettings(method="gptq", bits=4, group_size=64), 576, 1536)
    with pytest.raises(QuantizationError, match=r"group_size 128 does not divide.*hidden_size.*fit this model: "
                                                r"\[16, 32, 64, 96, 192\]"):
        check_group_size(QuantSettings(method="gptq", bits=4, group_size=128), 576, 1536)
    check_group_size(QuantSettings(method="fp8", bits=8, group_size=128), 576, 1536)  # no groups: fine
