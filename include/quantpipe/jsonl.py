"""Reading a user's JSONL file of texts: one place for the checks and their messages."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import PipelineError


def text_rows(path: Path, what: str, error: type[Exception] = PipelineError,
              field: str = "text") -> list[tuple[int, dict]]:
    """(line number, row) for each non-blank line; every row must be a JSON object with a
    non-empty string ``field``. ``what`` names the file in messages (e.g. "calibration dataset")."""
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{n}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict) or not isinstance(row.get(field), str) or not row[field].strip():
                raise error(f"{path}:{n}: each line needs a non-empty string field '{field}'")
            rows.append((n, row))
    if not rows:
        raise error(f"{what} {path} is empty")
    return rows
