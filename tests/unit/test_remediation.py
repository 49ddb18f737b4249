import pytest

from quantpipe.errors import PipelineError
from quantpipe.pipeline import latest_result, remediate, safer_settings, validate_params
from quantpipe.store import Store


def test_safer_settings_keep_sensitive_and_edge_layers_and_shrink_groups():
    s = validate_params({"method": "gptq", "bits": 4, "group_size": 64, "calibration_samples": 16}, store=Store.local())
    prev = {"settings": s, "passed": False, "failed_checks": ["perplexity"],
            "sensitive_layers": [f"model.layers.{i}.mlp.down_proj" for i in range(20)]}
    new, changes = safer_settings(s, prev, attempt=2, n_layers=30)
    ignore = new["quant"]["ignore"]
    assert ignore[0] == "lm_head"
    assert r"re:model\.layers\.0\..*" in ignore and r"re:model\.layers\.29\..*" in ignore
    assert sum(x.startswith("model.layers.") for x in ignore) == 12  # 6 per attempt
    assert new["quant"]["group_size"] == 32 and changes["group_size"] == [64, 32]
    assert new["calibration"]["num_samples"] == 32


def test_fp8_remediation_keeps_layers_only():
    s = validate_params({"method": "fp8", "bits": 8}, store=Store.local())
    new, changes = safer_settings(s, {"settings": s, "sensitive_layers": ["model.layers.3.mlp.up_proj"]}, 1, 30)
    assert "group_size" not in changes and "calibration_samples" not in changes
    assert "model.layers.3.mlp.up_proj" in new["quant"]["ignore"]


def test_remediation_not_run_when_passed_or_disabled():
    s = validate_params({"method": "fp8", "bits": 8}, store=Store.local())
    assert remediate(s, {}, [{"passed": True}], 1, "r", store=Store.local()) is None
    off = validate_params({"method": "fp8", "bits": 8, "remediation": False}, store=Store.local())
    assert remediate(off, {}, [{"passed": False, "failed_checks": ["x"]}], 1, "r", store=Store.local()) is None
    one = validate_params({"method": "fp8", "bits": 8, "remediation_attempts": 1}, store=Store.local())
    assert remediate(one, {}, [{"passed": False, "failed_checks": ["x"]}, None], 2, "r", store=Store.local()) is None


def test_latest_result():
    assert latest_result([{"a": 1}, None, {"a": 3}]) == {"a": 3}
    with pytest.raises(PipelineError):
        latest_result([None, None])
