"""Shared test setup: offline flags, an isolated Airflow home and artifact store per session."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from .live_airflow import admin_token, airflow_instance  # noqa: F401  (session fixtures)

REPO = Path(__file__).resolve().parents[1]
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="quantpipe-tests-"))
# The session's Airflow home and artifact store (GBs of checkpoints) go when pytest exits.
atexit.register(shutil.rmtree, _SESSION_TMP, True)

# Must be set before anything imports airflow.
os.environ.update({
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "AIRFLOW_HOME": str(_SESSION_TMP / "airflow"),
    "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
    "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_SESSION_TMP / 'airflow' / 'airflow.db'}",
    "QUANTPIPE_ARTIFACT_ROOT": str(_SESSION_TMP / "artifacts"),
})
os.environ.setdefault("QUANTPIPE_CACHE", str(REPO / ".cache"))


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return Path(os.environ["QUANTPIPE_CACHE"])


@pytest.fixture(scope="session")
def model_dir(cache_dir) -> Path:
    from quantpipe.assets.model import builtin_checkpoint

    return builtin_checkpoint("smollm2-135m-instruct", cache_dir)


@pytest.fixture(scope="session")
def corpus_dir(cache_dir) -> Path:
    from quantpipe.assets.corpus import builtin_corpus

    return builtin_corpus(cache_dir)


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated SQLite metadata DB for dag.test()."""
    home = Path(os.environ["AIRFLOW_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    airflow = str(Path(sys.executable).with_name("airflow"))
    subprocess.run([airflow, "db", "migrate"], check=True, capture_output=True, env=dict(os.environ))
    return home


@pytest.fixture(scope="session")
def artifact_root() -> Path:
    return Path(os.environ["QUANTPIPE_ARTIFACT_ROOT"])
