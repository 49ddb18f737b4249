"""Stage 5: serve the approved model on vLLM behind a stable endpoint (no Airflow imports)."""

from .api import deploy_approved, rollback, status

__all__ = ["deploy_approved", "rollback", "status"]
