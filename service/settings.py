"""Every knob of the server, read from CLLM4REC_* environment variables (docs/serving.md lists them).

One Settings object is built at start-up and handed to create_app; nothing else reads the
environment, so a test or an embedding program passes its own Settings instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def available_cpus() -> int:
    """CPUs this process may run on (a container's CPU set, not the host's core count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLLM4REC_", extra="ignore")

    checkpoint: Path | None = Field(None, description="checkpoint directory written by `cllm4rec train`")
    # The CLI binds to loopback so a laptop run is not exposed; containers set 0.0.0.0.
    host: str = Field("127.0.0.1", description="interface to listen on")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    # --- model ---
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA (half precision) when available, else CPU (float32)")
    torch_threads: int = Field(0, ge=0, description="intra-op CPU threads of the forward pass; 0: one per "
                               "available CPU")

    # --- batching ---
    max_batch_size: int = Field(32, ge=1, description="most requests scored in one forward pass")
    max_wait_ms: float = Field(2.0, ge=0, description="how long the first request of a batch waits for others")
    queue_size: int = Field(256, ge=1, description="requests waiting for the model; beyond this, 503 with "
                            "Retry-After")
    request_timeout_s: float = Field(10.0, gt=0, description="a recommendation not answered within this "
                                     "gets 504")

    # --- histories ---
    redis_url: str | None = Field(None, description="redis://host:port/db; unset: in-process store (one "
                                  "process only, lost on exit)")
    redis_key_prefix: str = Field("cllm4rec:", description="prefix of every Redis key (several deployments "
                                  "can share one Redis)")
    redis_timeout_s: float = Field(0.5, gt=0, description="connect and per-operation timeout of Redis calls")
    history_max_length: int = Field(200, ge=1, description="most recent items kept per user")
    seed_histories: bool = Field(True, description="copy the checkpoint's training histories into an empty "
                                 "store")
    seed_check_interval_s: float = Field(30.0, gt=0, description="how often an unseeded store (Redis down at "
                                         "start, or restarted empty) is checked again")

    shutdown_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM, how long in-flight requests may "
                                      "take to finish")

    @field_validator("log_level", mode="before")
    @classmethod
    def lower_case_level(cls, value):
        return value.lower() if isinstance(value, str) else value

    def resolved_torch_threads(self) -> int:
        return self.torch_threads or available_cpus()
