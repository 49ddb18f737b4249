"""Stage 4: the files that travel with the weights, compared with the baseline's.

vLLM serves a checkpoint with the tokenizer, chat template, generation defaults and model
config found beside its weights. A quantizer only adds its ``quantization_config``; any
other change alters what production serves while leaving the weights, and so every
measurement made with the baseline's tokenizer, untouched: an end-of-sequence id that
never comes (answers run to the token limit), a chat template that renders turns another
way, sampling defaults that differ, a rotary base or context length that changed.

Each file group is compared field by field after loading (so formatting and field order do
not count, and defaults filled in by the loader count as set); the differences are listed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

# config fields a quantizer writes or that only say where and how the file was saved
CONFIG_IGNORED = ("quantization_config", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
                  "_commit_hash", "use_cache")
GENERATION_IGNORED = ("transformers_version", "_from_model_config")
PROBE = ("Hello, world! 3 + 4 = 7.\n\tdef f(x):\n        return {'a': [1, 2]}\n"
         "Grüße, café, 東京, emoji 🙂 <|im_start|>user\nHi<|im_end|>\n")


def _diff(a: dict, b: dict, ignored: tuple[str, ...], what: str) -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if k in ignored:
            continue
        if a.get(k) != b.get(k):
            out.append(f"{what} {k}: baseline {json.dumps(a.get(k))[:80]}, candidate {json.dumps(b.get(k))[:80]}")
    return out


def config_differences(baseline_dir: Path, candidate_dir: Path) -> list[str]:
    """As loaded (defaults filled in, legacy fields mapped to this version's), and as written
    for the fields both files set: a value this transformers version no longer reads may still
    be read by the server. A field one file has and the other lacks is left to the loaded
    comparison: re-saving with another version moves fields (``rope_theta`` into
    ``rope_parameters``, ``torch_dtype`` to ``dtype``) without changing them."""
    from transformers import AutoConfig

    a = AutoConfig.from_pretrained(baseline_dir, trust_remote_code=False).to_dict()
    b = AutoConfig.from_pretrained(candidate_dir, trust_remote_code=False).to_dict()
    loaded = _diff(a, b, CONFIG_IGNORED, "config.json")
    ra, rb = (json.loads((d / "config.json").read_text()) for d in (baseline_dir, candidate_dir))
    both = set(ra) & set(rb)
    raw = _diff({k: ra[k] for k in both}, {k: rb[k] for k in both}, CONFIG_IGNORED + ("_model_name_or_path",),
                "config.json (as written)")
    seen = {d.split(":", 1)[0].removeprefix("config.json ") for d in loaded}
    return loaded + [d for d in raw if d.split(":", 1)[0].removeprefix("config.json (as written) ") not in seen]


def _generation(folder: Path) -> dict:
    """The generation defaults a server reads: the file, or (without one) what transformers
    derives from the model config, as ``save_pretrained`` would write it."""
    from transformers import AutoConfig, GenerationConfig

    if (folder / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(folder).to_dict()
    return GenerationConfig.from_model_config(AutoConfig.from_pretrained(folder, trust_remote_code=False)).to_dict()


def generation_differences(baseline_dir: Path, candidate_dir: Path) -> list[str]:
    return _diff(_generation(baseline_dir), _generation(candidate_dir), GENERATION_IGNORED, "generation defaults")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def tokenizer_fingerprint(tok) -> dict:
    """What serving reads from a tokenizer: vocabulary, special tokens and their ids, added
    tokens, the chat template, and how a probe text with code, Unicode and turn markers encodes."""
    added = {int(i): str(t) for i, t in (getattr(tok, "added_tokens_decoder", None) or {}).items()}
    template = getattr(tok, "chat_template", None)
    return {
        "vocabulary": _digest(sorted(tok.get_vocab().items())),
        "vocabulary size": len(tok),
        "special tokens": {k: str(v) for k, v in sorted(tok.special_tokens_map.items())},
        "special token ids": {k: getattr(tok, f"{k}_id", None) for k in ("bos_token", "eos_token", "pad_token",
                                                                          "unk_token")},
        "added tokens": _digest(sorted(added.items())),
        "chat template": _digest(template) if template else None,
        "probe encoding": _digest(tok(PROBE, add_special_tokens=True)["input_ids"]),
        "probe decoding": _digest(tok.decode(tok(PROBE, add_special_tokens=False)["input_ids"])),
    }


def tokenizer_differences(baseline_dir: Path, candidate_tok) -> list[str]:
    from transformers import AutoTokenizer

    a = tokenizer_fingerprint(AutoTokenizer.from_pretrained(baseline_dir, trust_remote_code=False))
    b = tokenizer_fingerprint(candidate_tok)
    return _diff(a, b, (), "tokenizer")


def companion_differences(baseline_dir: Path, candidate_dir: Path, candidate_tok) -> dict[str, list[str]]:
    """Per file group, what differs (an empty list: the same). A group that cannot be read is
    a difference that names the error, never a pass."""
    out = {}
    for group, fn in (("tokenizer", lambda: tokenizer_differences(baseline_dir, candidate_tok)),
                      ("generation", lambda: generation_differences(baseline_dir, candidate_dir)),
                      ("config", lambda: config_differences(baseline_dir, candidate_dir))):
        try:
            out[group] = fn()
        except Exception as e:  # noqa: BLE001 - an unreadable file is reported as the difference
            out[group] = [f"cannot be compared: {type(e).__name__}: {e}"]
    return out
