"""Stage 1b: baseline metrics of the unquantized checkpoint, cached by checkpoint hash.

The cache key is (checkpoint hash, evaluation settings, held-out corpus hash, task
sets, device kind: CPU float32 or GPU bfloat16), so re-quantizing the same checkpoint with another method never recomputes
them. Stored: ``baseline.json`` (figures, greedy outputs, per-item task scores) and
``reference.safetensors`` (top-k next-token log-probabilities for KL; no pickle).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..artifacts import ArtifactStore
from ..assets.corpus import read_texts
from ..hashing import sha256_file, sha256_json
from ..settings import EvalSettings
from ..validation.engine import Placement, resolve_placement
from ..validation.metrics import measure

log = logging.getLogger(__name__)
BASELINE_FILE = "baseline.json"
REFERENCE_FILE = "reference.safetensors"


def baseline_key(checkpoint_hash: str, heldout: Path, s: EvalSettings, tasks_dir: Path | None,
                 engine: str = "cpu-float32") -> str:
    key = {"ckpt": checkpoint_hash, "heldout": sha256_file(heldout), "eval": s.model_dump(),
           "tasks": tasks_dir.name if tasks_dir else None}
    if engine != "cpu-float32":  # CPU keys stay what they were before GPUs were an option
        key["engine"] = engine
    return sha256_json(key)[:24]


def compute_baseline(store: ArtifactStore, checkpoint: Path, checkpoint_hash: str, heldout: Path,
                     s: EvalSettings, tasks_dir: Path | None = None,
                     placement: Placement | None = None) -> tuple[str, dict, bool]:
    """Return (uri, metrics, reused). Measured where ``placement`` says (default: this worker)."""
    from safetensors.torch import save_file

    placement = placement or resolve_placement()
    key = baseline_key(checkpoint_hash, heldout, s, tasks_dir, placement.kind)
    found = store.find("baselines", key, deep=True)
    if found is not None:
        log.info("baseline for checkpoint %s found in cache (%s); not recomputing", checkpoint_hash[:12], key)
        return store.uri("baselines", key), json.loads((found / BASELINE_FILE).read_text()), True
    metrics = measure(checkpoint, read_texts(heldout), s, tasks_dir=tasks_dir, placement=placement)
    dist = metrics.pop("dist")
    metrics.pop("heldout_ids")
    metrics["checkpoint_hash"] = checkpoint_hash
    with store.writing("baselines", key, meta={"checkpoint_hash": checkpoint_hash}) as out:
        (out / BASELINE_FILE).write_text(json.dumps(metrics, indent=1))
        save_file({k: v.contiguous() for k, v in dist.items()}, str(out / REFERENCE_FILE))
    return store.uri("baselines", key), metrics, False


def load_reference(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / REFERENCE_FILE))
