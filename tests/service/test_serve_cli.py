"""The online commands: `cllm4rec serve` as a real process (SIGTERM ends it cleanly), their
errors, and `cllm4rec quickstart` (with a tiny backbone here; with the real one under -m slow)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import service.cli as cli
from serving_helpers import free_port, running_server, wait_ready

COMMAND = [sys.executable, "-m", "service.cli"]


def test_serve_command_serves_and_stops_on_sigterm(tiny_checkpoint, tmp_path):
    port = free_port()
    env = {**os.environ, "CLLM4REC_TORCH_THREADS": "1", "CLLM4REC_CHECKPOINT": str(tiny_checkpoint)}
    env.pop("CLLM4REC_REDIS_URL", None)
    log = (tmp_path / "serve.log").open("w+")
    process = subprocess.Popen(COMMAND + ["serve", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, process, 60)
        response = httpx.post(url + "/recommend", json={"user_id": "u3", "k": 4})
        assert response.status_code == 200 and len(response.json()["items"]) == 4
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
    log.seek(0)
    output = log.read()
    assert process.returncode == 0, output  # a clean drain is a clean exit (not 143, death by SIGTERM)
    assert "Application shutdown complete" in output


@pytest.mark.parametrize("argv, message", [
    (["serve", "--checkpoint", "/no/such/checkpoint"], "no such checkpoint directory"),
    (["serve"], "CLLM4REC_CHECKPOINT"),
])
def test_serve_errors_are_one_line(argv, message, monkeypatch, capsys):
    monkeypatch.delenv("CLLM4REC_CHECKPOINT", raising=False)
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_setting_is_reported(tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setenv("CLLM4REC_MAX_BATCH_SIZE", "0")
    assert cli.main(["serve", "--checkpoint", str(tiny_checkpoint)]) == 2
    assert "max_batch_size" in capsys.readouterr().err


def curl_commands(banner: str) -> list[str]:
    return [line.strip() for line in banner.splitlines() if line.strip().startswith("curl")]


def run_curls(banner: str, banner_url: str, url: str) -> None:
    """Every curl line of the banner works against the server at url. The lines are read as curl
    would read them (method, URL, headers, body) and sent with httpx, so no curl is needed here."""
    commands = curl_commands(banner)
    assert len(commands) >= 4
    for command in commands:
        words = shlex.split(command.split(" | ")[0])[1:]
        method, headers, body, target = "GET", {}, None, None
        for flag, value in zip(words, words[1:] + [""]):
            if flag == "-X":
                method = value
            elif flag == "-H":
                name, _, header = value.partition(":")
                headers[name] = header.strip()
            elif flag == "-d":
                body = value
            elif flag.startswith("http"):
                target = flag
        assert target and target.startswith(banner_url), command
        response = httpx.request(method, target.replace(banner_url, url), headers=headers, content=body, timeout=30)
        assert response.status_code == 200, (command, response.text)
        if "/metrics" in command:
            assert "cllm4rec_model_info" in response.text
        else:
            assert response.json()["user_id"], command


def test_quickstart_builds_reuses_and_prints_working_requests(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setitem(cli.QUICKSTART_TRAINING, "backbone", str(tiny_llama))
    monkeypatch.setitem(cli.QUICKSTART_TRAINING, "backbone_layers", 2)
    monkeypatch.setitem(cli.QUICKSTART_TRAINING, "pretrain_epochs", 1)
    monkeypatch.setitem(cli.QUICKSTART_TRAINING, "finetune_epochs", 1)
    monkeypatch.setenv("CLLM4REC_REDIS_URL", "redis://127.0.0.1:1/0")  # the quickstart ignores it
    served = []
    monkeypatch.setattr(cli, "serve", lambda settings, banner: served.append((settings, banner)) or 0)
    directory = tmp_path / "qs"
    assert cli.main(["quickstart", "--dir", str(directory), "--port", "8123"]) == 0
    assert (directory / "data" / "items.csv").exists() and (directory / "checkpoint" / "checkpoint.json").exists()
    settings, banner = served[0]
    assert settings.redis_url is None and settings.port == 8123 and settings.host == "127.0.0.1"
    assert Path(settings.checkpoint) == directory / "checkpoint"
    assert "http://localhost:8123" in banner

    # the second run reuses data and checkpoint
    monkeypatch.setattr(cli, "train", lambda config: pytest.fail("trained again"))
    assert cli.main(["quickstart", "--dir", str(directory), "--port", "8123"]) == 0
    with running_server(settings.model_copy(update={"torch_threads": 1})) as server:
        run_curls(banner, "http://localhost:8123", server.url)

    # --no-serve: build or reuse, then exit (the images' demo checkpoint: docker/train-checkpoint.sh)
    assert cli.main(["quickstart", "--dir", str(directory), "--no-serve"]) == 0
    assert len(served) == 2  # not served


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quickstart_with_the_real_backbone(tmp_path):
    """The README's main job on its own: generate, train with SmolLM2 (cut to a few layers), serve."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLLM4REC_") or k == "CLLM4REC_CACHE_DIR"}
    process = subprocess.Popen(COMMAND + ["quickstart", "--dir", str(tmp_path / "qs"), "--port", str(port)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if "Ctrl-C stops the server" in line:
                break
        output = "".join(lines)
        assert process.poll() is None, output
        assert re.search(r"trained in \d+ s", output), output
        run_curls(output, f"http://localhost:{port}", f"http://localhost:{port}")
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(30)


def test_limit_concurrency_reaches_uvicorn(tiny_checkpoint, monkeypatch):
    """CLLM4REC_LIMIT_CONCURRENCY caps uvicorn's connections and requests (0: no limit)."""
    seen = {}

    def record(server):
        seen["limit"] = server.config.limit_concurrency
    monkeypatch.setattr(cli, "run_until_stopped", record)
    for value, expected in (("7", 7), ("0", None)):
        monkeypatch.setenv("CLLM4REC_LIMIT_CONCURRENCY", value)
        assert cli.main(["serve", "--checkpoint", str(tiny_checkpoint)]) == 1  # never started: exit 1
        assert seen["limit"] == expected
