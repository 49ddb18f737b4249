"""Stage 2: sample, tokenize, validate and store a calibration set.

The stored set is plain JSON token ids (no pickle), content-addressed by the
hash of its inputs, so a re-run with the same inputs reuses it.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from pydantic import BaseModel

from ..artifacts import ArtifactStore
from ..jsonl import text_rows
from ..errors import CalibrationError
from ..hashing import sha256_file, sha256_json
from ..settings import CalibrationSettings

log = logging.getLogger(__name__)
SAMPLES_FILE = "samples.jsonl"


class CalibrationResult(BaseModel):
    uri: str
    key: str
    num_samples: int
    total_tokens: int
    min_len: int
    max_len: int
    distinct_token_ratio: float
    source: str
    reused: bool = False


def read_jsonl_texts(path: Path) -> list[str]:
    return [row["text"] for _, row in text_rows(path, "calibration dataset", CalibrationError)]


def sample_and_tokenize(texts: list[str], tokenizer, s: CalibrationSettings) -> list[list[int]]:
    """Seeded sample of texts, tokenized and truncated; too-short texts are skipped."""
    if not texts:
        raise CalibrationError("calibration corpus is empty")
    order = list(range(len(texts)))
    random.Random(s.seed).shuffle(order)
    rows: list[list[int]] = []
    short = 0
    for i in order:
        ids = tokenizer(texts[i], add_special_tokens=True, truncation=True,
                        max_length=s.max_seq_length)["input_ids"]
        if len(ids) < s.min_tokens:
            short += 1
            continue
        rows.append(list(ids))
        if len(rows) == s.num_samples:
            break
    if len(rows) < s.num_samples:
        raise CalibrationError(
            f"only {len(rows)} of {len(texts)} texts have at least {s.min_tokens} tokens "
            f"({short} too short); need {s.num_samples}: lower calibration_samples or supply longer texts")
    return rows


def validate_samples(rows: list[list[int]], vocab_size: int, s: CalibrationSettings) -> dict:
    """Shape, vocabulary range and diversity checks; returns the figures."""
    if not rows:
        raise CalibrationError("calibration set is empty")
    lens = [len(r) for r in rows]
    if min(lens) < s.min_tokens or max(lens) > s.max_seq_length:
        raise CalibrationError(f"sample lengths {min(lens)}..{max(lens)} outside "
                               f"[{s.min_tokens}, {s.max_seq_length}]")
    bad = [(i, t) for i, r in enumerate(rows) for t in r if not 0 <= t < vocab_size]
    if bad:
        i, t = bad[0]
        raise CalibrationError(f"{len(bad)} token ids outside the vocabulary [0, {vocab_size}); "
                               f"first: id {t} in sample {i}. Was the set tokenized for another model?")
    total = sum(lens)
    distinct = len({t for r in rows for t in r})
    ratio = distinct / total
    if ratio < s.min_distinct_token_ratio:
        raise CalibrationError(f"calibration set is not diverse: {distinct} distinct ids in {total} tokens "
                               f"({ratio:.3f} < {s.min_distinct_token_ratio}); use more varied texts")
    dupes = len(rows) - len({tuple(r) for r in rows})
    if dupes > len(rows) // 4:
        raise CalibrationError(f"{dupes} of {len(rows)} calibration samples are duplicates")
    return {"num_samples": len(rows), "total_tokens": total, "min_len": min(lens), "max_len": max(lens),
            "distinct_token_ratio": round(ratio, 4)}


def build_calibration_set(store: ArtifactStore, texts_path: Path, tokenizer_path: Path, vocab_size: int,
                          s: CalibrationSettings) -> CalibrationResult:
    from transformers import AutoTokenizer

    tok_hash = sha256_file(tokenizer_path / "tokenizer.json") if (tokenizer_path / "tokenizer.json").is_file() \
        else str(tokenizer_path)
    key = sha256_json({"texts": sha256_file(texts_path), "tokenizer": tok_hash, "settings": s.model_dump(),
                       "vocab": vocab_size})[:16]
    found = store.find("calibration", key, deep=True)
    if found is not None:
        stats = json.loads((found / "stats.json").read_text())
        log.info("calibration set %s already stored and verified; reusing it", key)
        return CalibrationResult(uri=store.uri("calibration", key), key=key, source=str(texts_path),
                                 reused=True, **stats)
    texts = read_jsonl_texts(texts_path)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    rows = sample_and_tokenize(texts, tokenizer, s)
    stats = validate_samples(rows, vocab_size, s)
    log.info("calibration: %d samples, %d tokens (%d..%d per sample), distinct ratio %.3f",
             stats["num_samples"], stats["total_tokens"], stats["min_len"], stats["max_len"],
             stats["distinct_token_ratio"])
    with store.writing("calibration", key, meta={"settings": s.model_dump(), "source": str(texts_path)}) as out:
        with open(out / SAMPLES_FILE, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        (out / "stats.json").write_text(json.dumps(stats, indent=1))
    return CalibrationResult(uri=store.uri("calibration", key), key=key, source=str(texts_path), **stats)


def load_samples(folder: Path) -> list[list[int]]:
    return [json.loads(line) for line in open(folder / SAMPLES_FILE) if line.strip()]
