"""Settings: read from CLLM4REC_* variables, command-line options on top, every one documented."""

from __future__ import annotations

from pathlib import Path

from service.cli import settings_from
from service.settings import Settings

DOCS = Path(__file__).parents[2] / "docs" / "serving.md"


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("CLLM4REC_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("CLLM4REC_LOG_LEVEL", "WARNING")  # as operators write it
    monkeypatch.setenv("CLLM4REC_PORT", "9000")
    settings = settings_from(port=None, host="0.0.0.0")
    assert (settings.max_batch_size, settings.log_level) == (4, "warning")
    assert (settings.port, settings.host) == (9000, "0.0.0.0")
    assert settings_from(port=8001).port == 8001  # an option beats the variable


def test_defaults(monkeypatch):
    for name in Settings.model_fields:
        monkeypatch.delenv(f"CLLM4REC_{name.upper()}", raising=False)
    settings = Settings()
    assert (settings.host, settings.port, settings.redis_url, settings.device) == ("127.0.0.1", 8000, None, "auto")
    assert settings.resolved_torch_threads() >= 1


def test_every_setting_is_documented():
    docs = DOCS.read_text()
    missing = [name for name in Settings.model_fields if f"`CLLM4REC_{name.upper()}`" not in docs]
    assert not missing, f"docs/serving.md lacks {missing}"
