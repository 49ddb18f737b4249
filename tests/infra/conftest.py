"""Real-server fixtures for the infrastructure tests (see servers.py)."""

from .servers import postgres_srv, redis_srv, s3_srv  # noqa: F401  (pytest fixtures)
