"""Stage 4: each decoder block of the candidate against the same block with the baseline's weights.

Held-out windows run through the candidate once and every block's input is kept. Each block
is then rebuilt from the model config with the baseline's tensors (a plain block, no
quantization) and run on that same input. What a block adds to the residual stream (its
output minus its input) is compared position by position: the relative error of that update,
averaged over the positions, is the block's damage.

Function-preserving rescalings (SmoothQuant's and AWQ's smoothing) leave it unchanged;
quantization noise moves it by a few percent up to ~20 % at 4 bits; a zeroed, mis-scaled or
mis-wired block by most of its size. Both runs share the block's input, so the error of
earlier blocks does not pile into later ones: each block is judged on its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .untouched import safetensors_files

log = logging.getLogger(__name__)


UNIT = 32  # consecutive positions resampled together for the interval


@dataclass
class BlockErrors:
    errors: list[float]  # per block, mean relative error of its residual update
    unit_means: list[list[float]]  # per block, the mean over each run of UNIT positions
    positions: int

    def worst(self, k: int = 3) -> list[tuple[int, float]]:
        return sorted(enumerate(self.errors), key=lambda x: -x[1])[:k]


def decoder_blocks(model):
    """(name, ModuleList) of the model's decoder blocks."""
    import torch

    n = getattr(model.config, "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and n and len(mod) == n:
            return name, mod
    raise ValueError(f"no list of {n} decoder blocks in {type(model).__name__}")


class _BaselineBlocks:
    """The baseline's tensors of one block at a time (a 70B model's blocks never all in memory)."""

    def __init__(self, baseline_dir: Path, prefix: str):
        from safetensors import safe_open

        self.where: dict[int, list[tuple[Path, str, str]]] = {}
        for f in safetensors_files(Path(baseline_dir)):
            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():
                    if name.startswith(prefix + "."):
                        idx, rest = name[len(prefix) + 1:].split(".", 1)
                        self.where.setdefault(int(idx), []).append((f, name, rest))

    def __getitem__(self, i: int) -> dict:
        from safetensors import safe_open

        out = {}
        for f, name, rest in self.where.get(i, []):
            with safe_open(str(f), framework="pt") as fh:
                out[rest] = fh.get_tensor(name)
        return out


def _to(x, device):
    import torch

    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def block_errors(model, baseline_dir: Path, windows: list[list[int]]) -> BlockErrors:
    """Per decoder block of ``model`` (the candidate, as evaluation loaded it), the mean
    relative error of its residual update against the baseline's block on the same inputs."""
    import torch

    prefix, blocks = decoder_blocks(model)
    captured: dict[int, list] = {}

    def keep_input(i):
        def hook(_mod, args, kwargs):
            captured[i] = [args, kwargs]
        return hook

    def keep_output(i):
        def hook(_mod, _args, _kwargs, out):
            captured[i].append(out[0] if isinstance(out, tuple) else out)
        return hook

    hooks = []
    for i, b in enumerate(blocks):
        hooks.append(b.register_forward_pre_hook(keep_input(i), with_kwargs=True))
        hooks.append(b.register_forward_hook(keep_output(i), with_kwargs=True))
    first = next(model.parameters())
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor(windows, device=first.device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    base = _BaselineBlocks(baseline_dir, prefix)
    errors, units, positions = [], [], 0
    with torch.no_grad():
        for i, b in enumerate(blocks):
            args, kwargs, out = captured.pop(i)
            param = next(b.parameters())
            ref = type(b)(model.config, i).to(device=param.device, dtype=param.dtype)
            missing, _ = ref.load_state_dict(base[i], strict=False)
            if missing:
                raise ValueError(f"the baseline lacks tensors of block {i}: {missing[:4]}")
            ref.eval()
            args, kwargs = _to(args, param.device), _to(kwargs, param.device)
            h = args[0] if args else kwargs["hidden_states"]
            r = ref(*args, **kwargs)
            r = (r[0] if isinstance(r, tuple) else r).float()[:, 1:]  # position 0 (the attention sink) left out
            upd = r - h.float()[:, 1:]
            err = (out.to(param.device).float()[:, 1:] - r).norm(dim=-1) / upd.norm(dim=-1).clamp_min(1e-6)
            errors.append(float(err.mean()))
            n = err.shape[1] // UNIT * UNIT
            units.append(err[:, :n].reshape(err.shape[0], -1, UNIT).mean(-1).flatten().cpu().tolist())
            positions = int(err.numel())
            del ref
    return BlockErrors(errors, units, positions)
