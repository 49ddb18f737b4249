"""Typed settings for stage 6 (monitoring); each default is defined here once.

Env vars ``QUANTPIPE_MONITOR_<FIELD>`` override the defaults; a dict of overrides
passed by the caller wins over both.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import PipelineError

ENV_PREFIX = "QUANTPIPE_MONITOR_"
PROBE_FILE = Path(__file__).with_name("probe_prompts.json")


class MonitorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    pushgateway_url: str = Field("http://127.0.0.1:9091", title="Pushgateway base URL")
    prometheus_url: str = Field("http://127.0.0.1:9090", title="Prometheus base URL (HTTP API)")
    endpoint_url: str = Field("http://127.0.0.1:8000", title="Stable endpoint the probe calls (no /v1)")
    push_job: str = Field("quantpipe_quality_probe", title="Pushgateway job name")
    probe_file: Path = Field(PROBE_FILE, title="Known prompts with expected answers (JSON)")
    probe_max_tokens: int = Field(16, ge=1, le=512, title="Greedy tokens per probe prompt")
    quality_threshold: float = Field(0.75, ge=0, le=1, title="Alert when the rolling quality score drops below")
    latency_slo_s: float = Field(10.0, gt=0, title="p99 end-to-end latency SLO (seconds)")
    latency_window: str = Field("15m", title="PromQL rate window for the p99")
    request_timeout_s: float = Field(120, gt=0, title="Timeout of one probe / query request")

    @field_validator("pushgateway_url", "prometheus_url", "endpoint_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"{v!r} must be an http(s):// URL")
        return v.rstrip("/")

    @field_validator("latency_window")
    @classmethod
    def _window(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"[0-9]+[smhd]", v):
            raise ValueError(f"latency_window {v!r} must be a PromQL duration like 5m")
        return v

    @classmethod
    def load(cls, overrides: dict | None = None, environ: dict | None = None) -> "MonitorSettings":
        env = os.environ if environ is None else environ
        values = {n: env[ENV_PREFIX + n.upper()] for n in cls.model_fields if env.get(ENV_PREFIX + n.upper())}
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        try:
            return cls(**values)
        except ValueError as e:
            raise PipelineError(f"invalid monitoring settings: {e}") from e
