"""The UI tests use the shared live Airflow instance (tests/live_airflow.py) and the plugins."""

from __future__ import annotations

import sys
from pathlib import Path

from ..live_airflow import wait_for_dag  # noqa: F401  (re-exported for the UI tests)

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "plugins"))
