"""Every knob of the server, read from CLLM4REC_* environment variables (docs/serving.md lists them).

One Settings object is built at start-up and handed to create_app; nothing else reads the
environment, so a test or an embedding program passes its own Settings instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def available_cpus() -> int:
    """CPUs this process may run on (a container's CPU set, not the host's core count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


MIN_API_KEY_LENGTH = 16


class Settings(BaseSettings):
    # hide_input_in_errors: an error message must never echo a refused API key.
    model_config = SettingsConfigDict(env_prefix="CLLM4REC_", extra="ignore", hide_input_in_errors=True)

    checkpoint: Path | None = Field(None, description="checkpoint directory written by `cllm4rec train`")
    # The CLI binds to loopback so a laptop run is not exposed; containers set 0.0.0.0.
    host: str = Field("127.0.0.1", description="interface to listen on")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    # --- access ---
    api_key: SecretStr | None = Field(None, description="required on writes (POST /interactions, /admin/*) as "
                                      "'Authorization: Bearer KEY' or 'X-API-Key: KEY'; unset or empty: no key")
    auth_reads: bool = Field(False, description="require the API key on the recommendation endpoints too")

    # --- input limits (the OpenAPI schema states them) ---
    max_body_bytes: int = Field(1_048_576, ge=1, description="largest request body; beyond, 413")
    max_id_length: int = Field(256, ge=1, le=4096, description="longest user or item id, in characters")
    max_k: int = Field(1000, ge=1, description="largest k of a recommendation")
    max_history_items: int = Field(1000, ge=1, description="most item ids in a request's history or in one "
                                   "POST /interactions")
    max_batch_users: int = Field(100, ge=1, description="most requests in one POST /recommend/batch")

    # --- model ---
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when available, else CPU")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="weights of the backbone and embeddings; auto: float32, computed in bfloat16 "
        "on CUDA (autocast, as in training); float16/bfloat16: weights in half precision")
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

    @field_validator("api_key", mode="before")
    @classmethod
    def empty_key_is_no_key(cls, value):
        # `CLLM4REC_API_KEY=` (compose's ${VAR:-}, an optional Secret) means no key, as unset does.
        return None if value == "" else value

    @field_validator("api_key")
    @classmethod
    def guessable_key_is_refused(cls, value: SecretStr | None):
        # Clients send the key in a latin-1 HTTP header, so it is kept to printable ASCII; short keys
        # can be guessed. The message never contains the key.
        if value is not None:
            key = value.get_secret_value()
            if len(key) < MIN_API_KEY_LENGTH or not all("!" <= c <= "~" for c in key):
                raise ValueError(f"must be at least {MIN_API_KEY_LENGTH} printable ASCII characters without "
                                 "spaces (e.g. `openssl rand -hex 32`)")
        return value

    def resolved_torch_threads(self) -> int:
        return self.torch_threads or available_cpus()
