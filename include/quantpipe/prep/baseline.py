"""Stage 1b: baseline metrics of the unquantized checkpoint, cached by checkpoint hash.

The cache key is (checkpoint hash, evaluation settings, held-out corpus hash), so
re-quantizing the same checkpoint with another method never recomputes them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..artifacts import ArtifactStore
from ..assets.corpus import read_texts
from ..hashing import sha256_file, sha256_json
from ..settings import EvalSettings
from ..validation.metrics import measure

log = logging.getLogger(__name__)
BASELINE_FILE = "baseline.json"


def baseline_key(checkpoint_hash: str, heldout: Path, s: EvalSettings) -> str:
    return sha256_json({"ckpt": checkpoint_hash, "heldout": sha256_file(heldout), "eval": s.model_dump()})[:24]


def compute_baseline(store: ArtifactStore, checkpoint: Path, checkpoint_hash: str, heldout: Path,
                     s: EvalSettings) -> tuple[str, dict, bool]:
    """Return (uri, metrics, reused)."""
    key = baseline_key(checkpoint_hash, heldout, s)
    found = store.find("baselines", key, deep=True)
    if found is not None:
        log.info("baseline for checkpoint %s found in cache (%s); not recomputing", checkpoint_hash[:12], key)
        return store.uri("baselines", key), json.loads((found / BASELINE_FILE).read_text()), True
    metrics = measure(checkpoint, read_texts(heldout), s)
    metrics["checkpoint_hash"] = checkpoint_hash
    with store.writing("baselines", key, meta={"checkpoint_hash": checkpoint_hash}) as out:
        (out / BASELINE_FILE).write_text(json.dumps(metrics, indent=1))
    return store.uri("baselines", key), metrics, False
