"""Stage 3a: llm-compressor recipes for each method, from typed settings."""

from __future__ import annotations

from ..errors import QuantizationError
from ..settings import QuantSettings


def check_group_size(s: QuantSettings, hidden_size: int, intermediate_size: int) -> None:
    """Every quantized Linear's input width must be a multiple of the group size."""
    if not s.uses_groups:
        return
    widths = {"hidden_size": hidden_size, "intermediate_size": intermediate_size}
    bad = {k: v for k, v in widths.items() if v % s.group_size}
    if bad:
        fits = [g for g in (16, 32, 64, 96, 128, 192, 256) if all(v % g == 0 for v in widths.values())]
        raise QuantizationError(
            f"group_size {s.group_size} does not divide the layer widths {bad}; "
            f"group sizes that fit this model: {fits}")


def _scheme(s: QuantSettings):
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme(s.scheme, ["Linear"])
    if s.uses_groups:
        scheme.weights.group_size = s.group_size
    if s.method == "gptq":
        scheme.weights.observer = s.observer
    return scheme


def build_recipe(s: QuantSettings) -> list:
    """The modifiers for ``oneshot``; lm_head (and ``s.ignore``) stays unquantized."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    ignore = list(s.ignore)
    if s.method == "gptq":
        return [GPTQModifier(config_groups={"group_0": _scheme(s)}, ignore=ignore,
                             dampening_frac=s.dampening_frac)]
    if s.method == "awq":
        from llmcompressor.modifiers.transform import AWQModifier

        return [AWQModifier(), QuantizationModifier(config_groups={"group_0": _scheme(s)}, ignore=ignore)]
    if s.method == "fp8":
        return [QuantizationModifier(targets="Linear", scheme=s.scheme, ignore=ignore)]
    if s.method == "w8a8":
        from llmcompressor.modifiers.transform import SmoothQuantModifier

        return [SmoothQuantModifier(smoothing_strength=s.smoothing_strength),
                GPTQModifier(targets="Linear", scheme=s.scheme, ignore=ignore, dampening_frac=s.dampening_frac)]
    raise QuantizationError(f"unknown method {s.method!r}")
