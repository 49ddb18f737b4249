"""Stage 4: the tensors a recipe keeps in full precision, compared row by row with the baseline's.

A recipe changes the weights of the modules it quantizes and, when it smooths activations
(SmoothQuant, AWQ), the norms and weights inside the decoder blocks that it rescales.
Everything outside the blocks is copied as it was: the token embeddings, an output head the
recipe ignores, the final norm; and so is everything in a recipe without smoothing (FP8,
GPTQ) that it did not quantize. A change there is damage no recipe means (a row
written to the wrong index, a scale applied to the wrong tensor, a bad dtype cast), and it is
where damage confined to one capability lives most easily: a class of tokens' embedding rows.

The comparison is exact, not sampled: the check counts changed rows and names the tensors
and, for the embeddings and the output head, the tokens whose rows changed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ROW_TOLERANCE = 1e-2  # relative RMS change of a row; bf16 <-> fp16 storage moves a row ~4e-3
SCALE_SUFFIXES = (".weight_scale", ".weight_packed", ".weight_zero_point", ".weight_global_scale")
SMOOTHING_MODIFIERS = ("SmoothQuantModifier", "AWQModifier")
TOKEN_ROWS = ("embed_tokens.weight", "lm_head.weight")  # rows are token ids
BLOCK = re.compile(r"\.(layers|h|blocks|block)\.\d+\.")  # a tensor inside a decoder block
SHOWN = 24  # changed tokens named per tensor


@dataclass
class TensorChange:
    tensor: str
    rows: int
    changed: int
    max_error: float
    tokens: list[str] = field(default_factory=list)
    missing: bool = False


@dataclass
class UntouchedResult:
    compared: list[str]
    exempt: dict[str, str]  # tensor -> why it may change
    rows: int
    changes: list[TensorChange]

    @property
    def changed_rows(self) -> int:
        return sum(c.changed for c in self.changes)

    def summary(self) -> str:
        if not self.changes:
            return f"{len(self.compared)} tensors, {self.rows} rows unchanged"
        parts = []
        for c in self.changes[:8]:
            if c.missing:
                parts.append(f"{c.tensor}: missing or of another shape")
                continue
            toks = f" (tokens {', '.join(repr(t) for t in c.tokens)}{', ...' if c.changed > len(c.tokens) else ''})" \
                if c.tokens else ""
            parts.append(f"{c.tensor}: {c.changed} of {c.rows} rows changed, up to {c.max_error:.3g} of the row{toks}")
        more = f"; and {len(self.changes) - 8} more tensors" if len(self.changes) > 8 else ""
        return "; ".join(parts) + more


def safetensors_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
    return files


def _keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    out = []
    for f in safetensors_files(folder):
        with safe_open(str(f), framework="pt") as fh:
            out.extend(fh.keys())
    return out


def quantized_modules(candidate_dir: Path) -> set[str]:
    """Modules the candidate stores quantized (compressed-tensors scales beside their weight)."""
    return {k[: -len(s)] for k in _keys(candidate_dir) for s in SCALE_SUFFIXES if k.endswith(s)}


def recipe_text(candidate_dir: Path) -> str | None:
    recipe = candidate_dir / "recipe.yaml"
    return recipe.read_text() if recipe.is_file() else None


def exemptions(names: list[str], quantized: set[str], recipe: str | None) -> dict[str, str]:
    """Tensors the recipe may have changed, with the reason: the weights it quantized and,
    when its recipe smooths (or no recipe.yaml says what was done: a plain folder may hold
    weights fake-quantized in place), everything inside the decoder blocks. What lies
    outside them (embeddings, output head, final norm) no recipe touches."""
    smoothing = recipe is None or any(m in recipe for m in SMOOTHING_MODIFIERS)
    why = ("inside a decoder block, which the recipe's smoothing rescales" if recipe is not None else
           "inside a decoder block, and no recipe.yaml says what the quantizer did there")
    out = {}
    for name in names:
        if name.rsplit(".", 1)[0] in quantized:
            out[name] = "quantized by the recipe (measured by the divergence checks)"
        elif smoothing and BLOCK.search(name):
            out[name] = why
    return out


def _row_errors(base, cand, chunk: int = 8192):
    """Relative RMS change of each row (1-D tensors are one row)."""
    import torch

    b2 = base.reshape(base.shape[0], -1) if base.dim() > 1 else base.reshape(1, -1)
    c2 = cand.reshape(b2.shape)
    errs = []
    for i in range(0, b2.shape[0], chunk):
        b = b2[i:i + chunk].to(c2.device, torch.float32)
        c = c2[i:i + chunk].to(torch.float32)
        errs.append(((c - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-12)).cpu())
    return torch.cat(errs)


def compare_untouched(baseline_dir: Path, candidate_dir: Path, state: dict, tokenizer=None,
                      tolerance: float = ROW_TOLERANCE) -> UntouchedResult:
    """Every baseline tensor the candidate's recipe keeps in full precision against the
    candidate's (``state``: its dense state dict, as evaluation loaded it)."""
    import torch
    from safetensors import safe_open

    quantized = quantized_modules(candidate_dir)
    names = _keys(baseline_dir)
    exempt = exemptions(names, quantized, recipe_text(candidate_dir))
    compared, changes, rows = [], [], 0
    with torch.no_grad():
        for f in safetensors_files(baseline_dir):
            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():
                    if name in exempt:
                        continue
                    base = fh.get_tensor(name)
                    cand = state.get(name)
                    compared.append(name)
                    n = base.shape[0] if base.dim() > 1 else 1
                    rows += n
                    if cand is None or tuple(cand.shape) != tuple(base.shape):
                        changes.append(TensorChange(name, n, n, float("inf"), missing=True))
                        continue
                    err = _row_errors(base, cand)
                    bad = torch.nonzero(err > tolerance).flatten()
                    if len(bad):
                        toks = []
                        if tokenizer is not None and name.endswith(TOKEN_ROWS):
                            toks = [tokenizer.convert_ids_to_tokens(int(i)) for i in bad[:SHOWN]]
                        changes.append(TensorChange(name, n, int(len(bad)), float(err[bad].max()), toks))
    changes.sort(key=lambda c: -c.changed)
    return UntouchedResult(compared, exempt, rows, changes)
