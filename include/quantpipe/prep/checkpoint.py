"""Stage 1a: resolve a model URI to a local checkpoint folder and verify it.

Verification: config.json parses and names a causal-LM architecture; every
safetensors file has a readable header whose tensors fit the file (a truncated
file fails); if the folder carries checksums (our MANIFEST.json or a SHA256SUMS
file) every listed file must match. Nothing is loaded into memory beyond headers.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

from pydantic import BaseModel

from ..artifacts import MANIFEST
from ..errors import CheckpointError
from ..hashing import sha256_file, sha256_json

log = logging.getLogger(__name__)

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
HASHED_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".jinja")


class CheckpointInfo(BaseModel):
    path: str
    checkpoint_hash: str
    architecture: str
    model_type: str
    num_parameters: int
    size_bytes: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    vocab_size: int
    files: dict[str, str]  # name -> sha256


def read_safetensors_header(path: Path) -> dict:
    """Parse a safetensors header and check that every tensor lies inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path.name}: file is truncated ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 << 20):
            raise CheckpointError(f"{path.name}: header length {n} is larger than the file; file is corrupt")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path.name}: header is not valid JSON ({e}); file is corrupt") from e
    data_len = size - 8 - n
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        lo, hi = t["data_offsets"]
        count = 1
        for d in t["shape"]:
            count *= d
        if t["dtype"] in DTYPE_BYTES and hi - lo != count * DTYPE_BYTES[t["dtype"]]:
            raise CheckpointError(f"{path.name}: tensor {name} has {hi - lo} bytes for shape {t['shape']}")
        end = max(end, hi)
    if end != data_len:
        raise CheckpointError(f"{path.name}: tensors need {end} data bytes but the file holds {data_len}; "
                              "the file is truncated or corrupt")
    return header


def _expected_checksums(folder: Path) -> dict[str, str]:
    if (folder / MANIFEST).is_file():
        return {e["path"]: e["sha256"] for e in json.loads((folder / MANIFEST).read_text())["files"]}
    sums = folder / "SHA256SUMS"
    if sums.is_file():
        out = {}
        for line in sums.read_text().splitlines():
            if line.strip():
                digest, name = line.split(maxsplit=1)
                out[name.lstrip("*")] = digest
        return out
    return {}


def verify_checkpoint(folder: Path) -> CheckpointInfo:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder}: config.json is missing; not a Hugging Face checkpoint folder")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from e
    archs = cfg.get("architectures") or []
    if not archs or not any(a.endswith("ForCausalLM") for a in archs):
        raise CheckpointError(f"{cfg_path}: architectures {archs} has no *ForCausalLM model")
    for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
            raise CheckpointError(f"{cfg_path}: {key} missing or invalid ({cfg.get(key)!r})")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        bins = sorted(p.name for p in folder.glob("*.bin"))
        hint = f" (found {bins}: pickle weights are refused, convert them to safetensors)" if bins else ""
        raise CheckpointError(f"{folder}: no .safetensors weights{hint}")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        wanted = set(json.loads(index.read_text())["weight_map"].values())
        missing = sorted(wanted - {w.name for w in weights})
        if missing:
            raise CheckpointError(f"{folder}: shards {missing} named in the index are missing")
    expected = _expected_checksums(folder)
    files: dict[str, str] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix in HASHED_SUFFIXES and p.name != MANIFEST:
            files[p.name] = sha256_file(p)
    for name, digest in expected.items():
        if name not in files and not (folder / name).is_file():
            raise CheckpointError(f"{folder}: {name} is listed in the checksums but missing")
        got = files.get(name) or sha256_file(folder / name)
        if got != digest:
            raise CheckpointError(f"{folder / name}: sha256 {got} does not match the recorded {digest}; "
                                  "the file is corrupt or was modified")
    n_params, size = 0, 0
    for w in weights:
        header = read_safetensors_header(w)
        size += w.stat().st_size
        for name, t in header.items():
            if name != "__metadata__":
                count = 1
                for d in t["shape"]:
                    count *= d
                n_params += count
    info = CheckpointInfo(
        path=str(folder), checkpoint_hash=sha256_json(files), architecture=archs[0],
        model_type=cfg.get("model_type", "?"), num_parameters=n_params, size_bytes=size,
        hidden_size=cfg["hidden_size"], intermediate_size=cfg.get("intermediate_size", cfg["hidden_size"]),
        num_layers=cfg["num_hidden_layers"], vocab_size=cfg["vocab_size"], files=files)
    log.info("checkpoint %s: %s, %.1fM parameters, %.1f MB, hash %s", folder.name, info.architecture,
             n_params / 1e6, size / 1e6, info.checkpoint_hash[:12])
    return info
