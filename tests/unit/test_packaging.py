"""The built wheel carries every data file the library reads beside its modules.

Docker images install quantpipe non-editably (``pip install --no-deps /opt/quantpipe``), so a
file like ``quantpipe/validation/prompts.json`` exists there only if the wheel ships it
(``[tool.setuptools.package-data]`` in pyproject.toml). The data files are discovered from the
source tree: every file under include/quantpipe that is not Python source or a cache.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "include" / "quantpipe"


def data_files() -> list[str]:
    """Wheel paths (quantpipe/...) of every non-.py, non-cache file under include/quantpipe."""
    out = []
    for p in sorted(PACKAGE.rglob("*")):
        rel = p.relative_to(PACKAGE.parent)
        if not p.is_file() or p.suffix in (".py", ".pyc", ".pyo") or "__pycache__" in rel.parts \
                or any(part.startswith(".") for part in rel.parts):
            continue
        out.append(rel.as_posix())
    return out


def build_wheel(tmp: Path) -> Path:
    """Build the wheel from a clean copy of the build inputs (no build/ or egg-info left in the
    repo), offline: the venv's setuptools, no build isolation, no index."""
    src = tmp / "src"
    src.mkdir()
    shutil.copy2(REPO / "pyproject.toml", src / "pyproject.toml")
    shutil.copytree(REPO / "include", src / "include",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build"))
    out = tmp / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "-w", str(out), str(src)],
                       capture_output=True, text=True, timeout=300, cwd=tmp)
    assert r.returncode == 0, f"pip wheel failed:\n{r.stdout}\n{r.stderr}"
    wheels = list(out.glob("quantpipe-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_carries_every_data_file_the_code_reads(tmp_path):
    wanted = data_files()
    # the files the issue names; guards the discovery against finding nothing
    assert {"quantpipe/validation/prompts.json", "quantpipe/monitoring/probe_prompts.json"} <= set(wanted)
    with zipfile.ZipFile(build_wheel(tmp_path)) as whl:
        names = set(whl.namelist())
        missing = [f for f in wanted if f not in names]
        assert not missing, f"data files missing from the wheel (declare them in pyproject.toml " \
                            f"[tool.setuptools.package-data]): {missing}"
        for f in wanted:
            assert whl.read(f) == (PACKAGE.parent / f).read_bytes(), f"{f} differs in the wheel"
        assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")], "caches in the wheel"
