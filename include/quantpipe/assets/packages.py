"""Fetch a pinned wheel from PyPI without installing it, and verify its hash."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ..errors import PipelineError
from ..hashing import sha256_file


def fetch_wheel(name: str, version: str, sha256: str, dest: Path) -> Path:
    """``pip download --no-deps name==version`` into ``dest`` (reused if present), hash-checked."""
    dest.mkdir(parents=True, exist_ok=True)
    norm = name.replace("-", "_")
    found = sorted(dest.glob(f"{norm}-{version}-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               f"{name}=={version}", "-d", str(dest)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise PipelineError(f"could not download {name}=={version} from PyPI: {proc.stderr.strip()[-500:]}")
        found = sorted(dest.glob(f"{norm}-{version}-*.whl"))
        if not found:
            raise PipelineError(f"pip download of {name}=={version} produced no wheel in {dest}")
    wheel = found[0]
    got = sha256_file(wheel)
    if got != sha256:
        wheel.unlink()
        raise PipelineError(f"{wheel.name}: sha256 {got} != pinned {sha256}; removed it, try again")
    return wheel
