"""Stage 1b: baseline metrics of the unquantized checkpoint, cached by checkpoint hash.

The cache key is everything that changes the figures: checkpoint hash, evaluation
settings, the held-out domains' content hash, the prompts, task sets, the measuring
code's version, the libraries that compute it and the device kind (CPU float32 or GPU
bfloat16). Re-quantizing the same checkpoint with another method never recomputes them.
Stored: ``baseline.json`` (figures, greedy outputs, answers, per-item task scores) and
``reference.safetensors`` (per position: top-k next-token log-probabilities for KL,
NLL and top-1 for the slice checks; no pickle).
"""

from __future__ import annotations

import json
import logging
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

from ..artifacts import ArtifactStore
from ..hashing import sha256_file, sha256_json
from ..settings import EvalSettings
from ..validation.engine.placement import Placement, resolve_placement
from ..validation.metrics import measure

if TYPE_CHECKING:
    from ..validation.suite import TaskSuite

log = logging.getLogger(__name__)
BASELINE_FILE = "baseline.json"
REFERENCE_FILE = "reference.safetensors"


MEASURE_VERSION = 6  # v2: per-domain windows, per-position NLL/top-1, answer prompts; v3/4: answer confidence; v6: task suites
LIBRARIES = ("torch", "transformers", "lm_eval", "compressed-tensors")


def _installed(lib: str) -> str | None:
    try:
        return version(lib)
    except PackageNotFoundError:
        return None


def baseline_key(checkpoint_hash: str, heldout_hash: str, s: EvalSettings, tasks: TaskSuite | None,
                 engine: str = "cpu-float32") -> str:
    from ..validation.answers import answer_prompts
    from ..validation.metrics import PROMPTS_FILE

    key = {"ckpt": checkpoint_hash, "heldout": heldout_hash, "eval": s.model_dump(mode="json"),
           "tasks": tasks.key if tasks else None, "engine": engine, "version": MEASURE_VERSION,
           "prompts": sha256_file(PROMPTS_FILE), "answers": sha256_json(answer_prompts()),
           "libs": {lib: _installed(lib) for lib in LIBRARIES}}
    return sha256_json(key)[:24]


def compute_baseline(store: ArtifactStore, checkpoint: Path, checkpoint_hash: str, heldout: dict,
                     heldout_hash: str, s: EvalSettings, tasks: TaskSuite | None = None,
                     placement: Placement | None = None) -> tuple[str, dict, bool]:
    """Return (uri, metrics, reused). ``heldout``: domain -> rows (``assets.domains``), with
    its content hash. Measured where ``placement`` says (default: this worker)."""
    from safetensors.torch import save_file

    placement = placement or resolve_placement()
    key = baseline_key(checkpoint_hash, heldout_hash, s, tasks, placement.kind)
    found = store.find("baselines", key, deep=True)
    if found is not None:
        log.info("baseline for checkpoint %s found in cache (%s); not recomputing", checkpoint_hash[:12], key)
        return store.uri("baselines", key), json.loads((found / BASELINE_FILE).read_text()), True
    metrics = measure(checkpoint, heldout, s, tasks=tasks, placement=placement)
    dist = metrics.pop("dist")
    for k in ("heldout_ids", "windows", "per_position"):
        metrics.pop(k)
    metrics["heldout"]["content_sha256"] = heldout_hash
    metrics["checkpoint_hash"] = checkpoint_hash
    with store.writing("baselines", key, meta={"checkpoint_hash": checkpoint_hash}) as out:
        (out / BASELINE_FILE).write_text(json.dumps(metrics, indent=1))
        save_file({k: v.contiguous() for k, v in dist.items()}, str(out / REFERENCE_FILE))
    return store.uri("baselines", key), metrics, False


def load_reference(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / REFERENCE_FILE))
