"""Faults planted in the real small model, each confined to one capability, plus whole-model
faults. Shared by the planted suite (tests) and the distribution bench (bench/).

A plant edits the checkpoint's tensors the way a buggy quantizer could (a wrong scale on
some rows, rows written to the wrong index, a class of tokens rounded to garbage) and
writes a plain safetensors folder. Token classes are found from the tokenizer, never
hard-coded ids.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

EMBED = "model.embed_tokens.weight"  # tied with the output projection in SmolLM2


def plant(model_dir: Path, out: Path, edit) -> Path:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from quantpipe.quantization.run import PROVENANCE

    shutil.copytree(model_dir, out, ignore=shutil.ignore_patterns("MANIFEST.json"))
    tensors = load_file(str(out / "model.safetensors"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        edit(tensors, tok)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / PROVENANCE).write_text(json.dumps({"planted": True}))
    return out


def plant_files(model_dir: Path, out: Path, edit) -> Path:
    """The weights copied as they are; ``edit(folder)`` changes a file served beside them."""
    from quantpipe.quantization.run import PROVENANCE

    shutil.copytree(model_dir, out, ignore=shutil.ignore_patterns("MANIFEST.json"))
    edit(out)
    (out / PROVENANCE).write_text(json.dumps({"planted": True}))
    return out


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data, indent=2))


def _ids(tok, pred) -> list[int]:
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    return [i for i, p in enumerate(pieces) if p is not None and pred(tok.convert_tokens_to_string([p]))]


def _noise_rows(ts, ids: list[int], scale: float, seed: int) -> None:
    import torch

    w = ts[EMBED]
    g = torch.Generator().manual_seed(seed)
    rows = w[ids].float()
    noise = torch.randn(rows.shape, generator=g) * rows.std(1, keepdim=True) * scale
    w[ids] = (rows + noise).to(w.dtype)


def _rotate_rows(ts, ids: list[int]) -> None:
    """Each row takes the next one's values: every token of the class reads and writes as
    another member of the class (a scatter with an off-by-one index)."""
    w = ts[EMBED]
    w[ids] = w[ids[1:] + ids[:1]].clone()


def digits_noise(ts, tok):
    """Digit tokens' embedding rows perturbed by noise of 0.15x a row's spread: perplexity
    moves about 2 %, overall KL stays at FP8's level, the digits carry nearly all of it."""
    _noise_rows(ts, _ids(tok, lambda s: s.strip().isdigit()), 0.15, 0)


def digits_rotated(ts, tok):
    """Digit tokens written to the wrong rows: 3 reads as 4, predicts 4 where 3 was meant."""
    _rotate_rows(ts, _ids(tok, lambda s: len(s.strip()) == 1 and s.strip().isdigit() and s == s.strip()))


def brackets_swapped(ts, tok):
    """Opening and closing brackets and arithmetic operators exchanged."""
    pairs = [("(", ")"), ("[", "]"), ("{", "}"), ("+", "-"), ("<", ">"), ("*", "/")]
    w = ts[EMBED]
    for a, b in pairs:
        ia, ib = tok.convert_tokens_to_ids(a), tok.convert_tokens_to_ids(b)
        if ia is not None and ib is not None and ia != tok.unk_token_id and ib != tok.unk_token_id:
            w[[ia, ib]] = w[[ib, ia]].clone()


def whitespace_noise(ts, tok):
    """Whitespace and newline tokens (indentation, line breaks) perturbed by 0.3x a row's
    spread: perplexity +5 %, the error sits on format tokens."""
    _noise_rows(ts, _ids(tok, lambda s: bool(s) and not s.strip()), 0.3, 1)


def special_crushed(ts, tok):
    """End-of-turn and other special tokens' rows scaled down: turns never end right."""
    ids = sorted(set(tok.all_special_ids) | {tok.eos_token_id})
    ts[EMBED][ids] *= 0.05


def capitals_swapped(ts, tok):
    """The first tokens of capital-city names exchanged in pairs: every capital answered as
    another, everything else intact."""
    from quantpipe.validation.answers import _CAPITALS

    ids = [tok(" " + city, add_special_tokens=False)["input_ids"][0] for _, city in _CAPITALS]
    ids = list(dict.fromkeys(ids))
    w = ts[EMBED]
    for a, b in zip(ids[0::2], ids[1::2]):
        w[[a, b]] = w[[b, a]].clone()


def yes_no_swapped(ts, tok):
    """The rows of "yes" and "no" (each casing, with and without a leading space) exchanged:
    every yes/no answer inverted, a few dozen held-out positions touched."""
    w = ts[EMBED]
    for a, b in ((" yes", " no"), (" Yes", " No"), ("yes", "no"), ("Yes", "No")):
        ia, ib = (tok(x, add_special_tokens=False)["input_ids"] for x in (a, b))
        if len(ia) == 1 and len(ib) == 1:
            w[[ia[0], ib[0]]] = w[[ib[0], ia[0]]].clone()


CODE_NOISE = 0.5  # x a row's spread


def code_keywords_noise(ts, tok):
    """Python keywords and identifiers' pieces perturbed: code breaks, prose barely moves."""
    kw = ("def", "return", "for", "in", "if", "elif", "else", "while", "import", "from", "lambda", "assert",
          "len", "range", "True", "False", "None", "self", "print", "append", "int", "str", "list")
    ids = set()
    for k in kw:
        for form in (k, " " + k, "(" + k, "." + k):
            ids.update(tok(form, add_special_tokens=False)["input_ids"][-1:])
    _noise_rows(ts, sorted(ids), CODE_NOISE, 2)


# whole-model faults
def _rtn_2bit(t, group: int = 64):
    import torch

    w = t.float().reshape(-1, group)
    lo, hi = w.min(1, keepdim=True).values, w.max(1, keepdim=True).values
    scale = ((hi - lo) / 3).clamp_min(1e-8)
    q = torch.round((w - lo) / scale).clamp(0, 3)
    return (q * scale + lo).reshape(t.shape).to(t.dtype)


def two_bit(ts, tok):
    for k in list(ts):
        if k.endswith("proj.weight"):
            ts[k] = _rtn_2bit(ts[k])


def scales_perturbed(ts, tok):
    # what a wrong per-channel scale does: some output channels of every MLP come out 3x too large
    for k in list(ts):
        if k.endswith("mlp.down_proj.weight"):
            ts[k][::7] *= 3.0


def block_zeroed(ts, tok):
    for k in list(ts):
        if k.startswith("model.layers.12.") and k.endswith("proj.weight"):
            ts[k].zero_()


def lm_head_crushed(ts, tok):
    # the (tied) output projection scaled down: the argmax survives, the distribution does not
    key = "lm_head.weight" if "lm_head.weight" in ts else EMBED
    ts[key] *= 0.35


# faults in the files served beside the weights (the weights are the baseline's)
def eos_id_changed(folder: Path):
    """The end-of-sequence id in the generation defaults points at another token: served
    answers never stop where the model ends them."""
    _edit_json(folder / "generation_config.json", lambda d: d.update(eos_token_id=[13]))


def chat_template_altered(folder: Path):
    """The chat template renders turns without their end marker."""
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        jinja.write_text(jinja.read_text().replace("<|im_end|>", ""))
    else:
        _edit_json(folder / "tokenizer_config.json",
                   lambda d: d.update(chat_template=d["chat_template"].replace("<|im_end|>", "")))


def rope_base_changed(folder: Path):
    """The rotary base written 4x too large (a config re-saved from another version)."""
    def edit(d):
        rp = d.get("rope_parameters") or {}
        if "rope_theta" in rp:
            rp["rope_theta"] *= 4
        else:
            d["rope_theta"] = d.get("rope_theta", 10000.0) * 4
    _edit_json(folder / "config.json", edit)


# name -> (edit, checks of which at least one must fail)
CATEGORY = {
    "digits_noise": (digits_noise, {"kl_excess:class:digits", "disagree_excess:class:digits"}),
    "digits_rotated": (digits_rotated, {"kl:class:digits", "top1:class:digits", "flips:class:digits"}),
    "brackets_swapped": (brackets_swapped, {"kl:class:operators", "top1:class:operators",
                                            "flips:class:operators"}),
    "whitespace_noise": (whitespace_noise, {"kl_excess:class:whitespace", "disagree_excess:class:whitespace"}),
    "special_crushed": (special_crushed, {"kl:class:special", "top1:class:special", "flips:class:special"}),
    "capitals_swapped": (capitals_swapped, {"answers:fact"}),
    "yes_no_swapped": (yes_no_swapped, {"answers:yesno"}),
    "code_keywords_noise": (code_keywords_noise, {"kl_excess:domain:code", "disagree_excess:domain:code"}),
}
WHOLE = {
    "two_bit": (two_bit, {"perplexity", "kl_divergence", "top1_agreement", "blocks:worst"}),
    "scales_perturbed": (scales_perturbed, {"perplexity", "kl_divergence", "blocks:worst"}),
    "block_zeroed": (block_zeroed, {"blocks:worst"}),
    "lm_head_crushed": (lm_head_crushed, {"perplexity", "kl_divergence"}),
}

FILES = {
    "eos_id_changed": (eos_id_changed, {"files:generation"}),
    "chat_template_altered": (chat_template_altered, {"files:tokenizer"}),
    "rope_base_changed": (rope_base_changed, {"files:config"}),
}
ALL = {**CATEGORY, **WHOLE, **FILES}
# in bench/gate_distributions.py only: gross damage of a kind the suite's plants already meet
# (every block's output channels: two_bit, caught by blocks:worst and the overall checks; the
# tied embedding/head rows: the category plants, caught by weights:untouched), each failing
# 40+ checks there; left out of CI's suite for its 90-minute limit
BENCH_ONLY = ("scales_perturbed", "lm_head_crushed")
SUITE = {k: v for k, v in ALL.items() if k not in BENCH_ONLY}

# the sound 4-bit GPTQ the planted suite passes (the default recipe at group 32), quantized by
# test_dag_e2e's GPTQ run with the same settings: the session's store quantizes it once
GPTQ_SOUND = {"method": "gptq", "bits": 4, "group_size": 32, "calibration_samples": 32, "max_seq_length": 256}


def build(name: str, model_dir: Path, out: Path) -> Path:
    """The planted checkpoint ``name`` (of ``ALL``) written to ``out``."""
    edit = ALL[name][0]
    return (plant_files if name in FILES else plant)(model_dir, out, edit)
