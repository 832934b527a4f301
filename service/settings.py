"""Every knob of the server, read from CLLM4REC_* environment variables (docs/serving.md lists them).

One Settings object is built at start-up and handed to create_app; nothing else reads the
environment, so a test or an embedding program passes its own Settings instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
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

    # --- access (docs/serving.md, "Access") ---
    # Keys by scope: reads (/recommend*, GET /users/{id}/history), writes (POST /interactions, DELETE
    # /users/{id}/history) and admin (/admin/*). CLLM4REC_API_KEY serves every scope; a scoped key
    # serves its own. A scope with neither is open (admin: to this host only).
    api_key: SecretStr | None = Field(None, description="key of every scope, sent as 'Authorization: Bearer KEY' "
                                      "or 'X-API-Key: KEY'; unset or empty: no key")
    read_key: SecretStr | None = Field(None, description="key of the read endpoints (/recommend*, GET history)")
    write_key: SecretStr | None = Field(None, description="key of the write endpoints (POST /interactions, "
                                        "DELETE history), e.g. for event collectors")
    admin_key: SecretStr | None = Field(None, description="key of /admin/reload")
    auth_reads: bool = Field(True, description="with a key configured, reads need one too; false opens reads "
                             "to anyone who can reach the server (trusted networks only: a caller can then read "
                             "any user's recommendations)")
    checkpoint_root: Path | None = Field(None, description="/admin/reload loads only checkpoints under this "
                                         "directory; unset: the configured checkpoint's parent directory")

    # --- input limits (the OpenAPI schema states them) ---
    max_body_bytes: int = Field(1_048_576, ge=1, description="largest request body; beyond, 413")
    max_id_length: int = Field(256, ge=1, le=4096, description="longest user or item id, in characters")
    max_k: int = Field(1000, ge=1, description="largest k of a recommendation")
    max_history_items: int = Field(1000, ge=1, description="most item ids in a request's history or in one "
                                   "POST /interactions")
    max_batch_users: int = Field(100, ge=1, description="most requests in one POST /recommend/batch")
    max_rule_items: int = Field(10_000, ge=1, description="most item ids in a request's exclude_item_ids or "
                                "candidate_item_ids")

    # --- model ---
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when available, else CPU")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="weights of the backbone and embeddings; auto: float32 weights, the backbone run "
        "the fastest way that measures at load with the same top 20 (service/precision.py): on CUDA computing in "
        "bfloat16 (autocast, as in training), eager or from CUDA graphs; on a CPU PyTorch's float32, ONNX "
        "Runtime's float32 or, with bfloat16 units, a bfloat16 format (small and large batches may each get their "
        "own); float16/bfloat16: all weights in half precision")
    backbone_format: str = Field(
        "auto", description="with CLLM4REC_DTYPE=auto, the backbone's format: auto: chosen by measurement at load; "
        "or the one to serve, as /readyz's `precision` names it (float32, float32-onnxruntime, bfloat16, "
        "bfloat16-linear, float32-cuda-graphs, or SMALL+LARGE@N: SMALL for batches of fewer than N prompts, LARGE "
        "from N), untimed, so that every replica serves the same one; its top 20 is still compared with float32's "
        "at load (the log warns below 98%)")
    torch_threads: int = Field(0, ge=0, description="intra-op CPU threads of the forward pass; 0: one per "
                               "available CPU")
    onnxruntime_spinning: bool = Field(False, description="ONNX Runtime's threads spin instead of sleeping "
                                       "between a pass's operations and a little after it: 9.5-10% lower p50 on "
                                       "an otherwise idle machine, for a busy core that the event loop, Redis or a "
                                       "CPU quota may need; for dedicated cores")

    # --- batching ---
    max_batch_size: int = Field(32, ge=1, description="most requests scored in one forward pass")
    max_wait_ms: float = Field(2.0, ge=0, description="how long a batch waits for requests on their way to it "
                               "(reading their histories); a lone request does not wait")
    lone_pass_on_loop: bool = Field(True, description="a request with nothing to batch with is scored on the "
                                    "event loop's thread, without the hop to the forward thread and back; the "
                                    "loop reads no other request during that pass, and the request's deadline "
                                    "(CLLM4REC_REQUEST_TIMEOUT_S) is not checked until it ends")
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
    history_ttl_s: int = Field(0, ge=0, description="a history key expires this many seconds after its last "
                               "write (0: never)")
    seed_histories: bool = Field(True, description="merge the checkpoint's training histories into the store "
                                 "(once per model version)")
    seed_check_interval_s: float = Field(30.0, gt=0, description="how often an unseeded store (Redis down at "
                                         "start, or restarted empty) is checked again")

    limit_concurrency: int = Field(0, ge=0, description="most connections and requests in progress; beyond, "
                                   "uvicorn answers 503 at once (0: no limit)")
    shutdown_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM, how long in-flight requests may "
                                      "take to finish")

    @field_validator("log_level", mode="before")
    @classmethod
    def lower_case_level(cls, value):
        return value.lower() if isinstance(value, str) else value

    @field_validator("api_key", "read_key", "write_key", "admin_key", mode="before")
    @classmethod
    def empty_key_is_no_key(cls, value):
        # `CLLM4REC_API_KEY=` (compose's ${VAR:-}, an optional Secret) means no key, as unset does.
        return None if value == "" else value

    @field_validator("api_key", "read_key", "write_key", "admin_key")
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

    @model_validator(mode="after")
    def reads_are_not_left_open_by_accident(self):
        # Scoped keys only, none for reads: reads would be open to anyone while writes are guarded,
        # and a read shows a user's recommendations. Say so instead of serving that.
        if self.auth_reads and self.api_key is None and self.read_key is None and (self.write_key or self.admin_key):
            raise ValueError("CLLM4REC_WRITE_KEY or CLLM4REC_ADMIN_KEY is set but reads have no key: set "
                             "CLLM4REC_READ_KEY (or CLLM4REC_API_KEY), or CLLM4REC_AUTH_READS=false to leave "
                             "reads open (trusted networks only)")
        return self

    @model_validator(mode="after")
    def backbone_format_needs_float32_weights(self):
        if self.backbone_format != "auto" and self.dtype != "auto":
            raise ValueError(f"CLLM4REC_BACKBONE_FORMAT={self.backbone_format} picks the format of float32 weights: "
                             f"it needs CLLM4REC_DTYPE=auto, not {self.dtype}")
        return self

    def scope_keys(self, scope: Literal["read", "write", "admin"]) -> list[str]:
        """The keys a request of this scope may carry ([]: the scope is open)."""
        if scope == "read" and not self.auth_reads:
            return []
        own = {"read": self.read_key, "write": self.write_key, "admin": self.admin_key}[scope]
        return [key.get_secret_value() for key in (own, self.api_key) if key is not None]

    def any_key(self) -> bool:
        return any(key is not None for key in (self.api_key, self.read_key, self.write_key, self.admin_key))

    def reload_root(self) -> Path | None:
        root = self.checkpoint_root or (self.checkpoint.parent if self.checkpoint is not None else None)
        return root.resolve() if root is not None else None

    def resolved_torch_threads(self) -> int:
        return self.torch_threads or available_cpus()
