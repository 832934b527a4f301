"""Faults: a missing, corrupt or incompatible checkpoint stops `cllm4rec serve` at once with one
line naming the problem; Redis crashing and restarting under a stream of POST /interactions loses
no acknowledged event, fails the requests it hits fast with 503, and needs no server restart; a dead
forward-pass worker makes the replica unready and stops `cllm4rec serve`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
import redis

from model.checkpoint import EMBEDDINGS_FILE, META_FILE
from service.cli import Server
from serving_helpers import OwnRedis, free_port, metric_value, running_server, server_settings, start_server


# --- a bad checkpoint at start -------------------------------------------------------------------

def edit_meta(directory, change) -> None:
    meta = json.loads((directory / META_FILE).read_text())
    change(meta)
    (directory / META_FILE).write_text(json.dumps(meta))


def missing(path, make_backbone) -> str:
    shutil.rmtree(path)
    return "no such checkpoint directory"


def truncated_embeddings(path, make_backbone) -> str:
    (path / EMBEDDINGS_FILE).write_bytes((path / EMBEDDINGS_FILE).read_bytes()[:-100])
    return "embeddings.safetensors does not match its checksum"


def metadata_not_json(path, make_backbone) -> str:
    (path / META_FILE).write_text((path / META_FILE).read_text()[:50])
    return "checkpoint.json: not valid JSON"


def newer_format(path, make_backbone) -> str:
    edit_meta(path, lambda meta: meta.update(format_version=99))
    return "checkpoint format version 99, this cllm4rec reads versions 1, 2"


def backbone_of_another_width(path, make_backbone) -> str:
    wider = make_backbone("llama", hidden=48)
    edit_meta(path, lambda meta: meta["backbone"].update(name=str(wider)))
    return "the checkpoint was trained on 300 of width 32"


def backbone_gone(path, make_backbone) -> str:
    edit_meta(path, lambda meta: meta["backbone"].update(name=str(path / "no-such-backbone")))
    return "cannot load backbone"


@pytest.mark.parametrize("damage", [missing, truncated_embeddings, metadata_not_json, newer_format,
                                    backbone_of_another_width, backbone_gone])
def test_bad_checkpoint_at_start_is_one_line_and_exit_2(damage, tiny_checkpoint, make_backbone, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, checkpoint)
    problem = damage(checkpoint, make_backbone)
    env = {**os.environ, "CLLM4REC_TORCH_THREADS": "1"}
    env.pop("CLLM4REC_REDIS_URL", None)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--checkpoint", str(checkpoint),
                             "--port", str(free_port())], env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - started < 60  # exits by itself, promptly: nothing waits or listens
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("cllm4rec: error:")]
    assert len(errors) == 1 and problem in errors[0], result.stderr
    assert result.stderr.rstrip().endswith(errors[0])  # the last word is the reason


# --- Redis restarts under writes -----------------------------------------------------------------

@dataclass
class Writer:
    """A client appending numbered events for its own user, one POST at a time, until stopped."""

    user_id: str
    acknowledged: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # answered 503: maybe stored, maybe not
    statuses: Counter = field(default_factory=Counter)
    slowest_refusal_s: float = 0.0
    last_acknowledged_at: float = 0.0

    def run(self, client, stop: threading.Event) -> None:
        n = 0
        while not stop.is_set():
            event = f"{self.user_id}-e{n}"
            n += 1
            started = time.monotonic()
            response = client.post("/interactions", json={"user_id": self.user_id, "item_ids": [event]})
            self.statuses[response.status_code] += 1
            if response.status_code == 200:
                self.acknowledged.append(event)
                self.last_acknowledged_at = time.monotonic()
            else:
                self.refused.append(event)
                self.slowest_refusal_s = max(self.slowest_refusal_s, time.monotonic() - started)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fsync", ["always", "everysec"])
def test_acknowledged_interactions_survive_redis_crashes_and_restarts(tiny_checkpoint, tmp_path, fsync):
    """`always` (fsync per write) and `everysec` (the deployed setting): Redis write()s the append-only
    file before it replies, so a crash of the Redis process loses nothing acknowledged with either;
    what everysec can lose is the last second or so on a crash of the machine (not simulated here)."""
    own = OwnRedis(tmp_path, persistent=True, fsync=fsync)
    own.start()
    timeout_s = 0.3
    settings = server_settings(tiny_checkpoint, redis_url=own.url, redis_timeout_s=timeout_s,
                               history_max_length=1_000_000, seed_check_interval_s=0.2)
    writers = [Writer(f"durability-{w}") for w in range(4)]
    stop = threading.Event()
    try:
        with running_server(settings) as server:
            clients = [server.client() for _ in writers]
            threads = [threading.Thread(target=w.run, args=(c, stop)) for w, c in zip(writers, clients)]
            for thread in threads:
                thread.start()
            time.sleep(1.0)
            own.crash()  # SIGKILL mid-stream
            time.sleep(1.0)
            own.start()  # the same data directory: the append-only file is replayed
            time.sleep(1.0)
            own.stop()  # a clean restart too
            own.start()
            recovered_at = time.monotonic()
            time.sleep(1.5)
            stop.set()
            for thread in threads:
                thread.join(30)
            for client in clients:
                client.close()
        store = redis.Redis(port=own.port, decode_responses=True)
        stored = {w.user_id: store.lrange(f"{settings.redis_key_prefix}history:{w.user_id}", 0, -1) for w in writers}
        store.close()
    finally:
        own.stop()

    sent = sum(sum(w.statuses.values()) for w in writers)
    acknowledged = sum(len(w.acknowledged) for w in writers)
    lost = sum(len(set(w.acknowledged) - set(stored[w.user_id])) for w in writers)
    landed_anyway = sum(len(set(w.refused) & set(stored[w.user_id])) for w in writers)
    statuses = sum((w.statuses for w in writers), Counter())
    print(f"\ndurability (appendfsync {fsync}): {sent} POST /interactions, {acknowledged} acknowledged (200), "
          f"{statuses[503]} refused (503), events lost {lost}, refused but stored {landed_anyway}, "
          f"slowest refusal {max(w.slowest_refusal_s for w in writers) * 1000:.0f} ms")
    assert lost == 0
    assert set(statuses) == {200, 503}, statuses  # the outages were hit, and answered only with 503
    assert max(w.slowest_refusal_s for w in writers) < 10 * timeout_s  # fail fast, never hang
    assert all(w.last_acknowledged_at > recovered_at for w in writers)  # writes resumed without a server restart
    for writer in writers:  # stored in the order acknowledged, each once
        acknowledged_in_store = [e for e in stored[writer.user_id] if e in set(writer.acknowledged)]
        assert acknowledged_in_store == writer.acknowledged


# --- a dead forward-pass worker --------------------------------------------------------------------

def kill_the_batcher(server) -> None:
    worker = server.engine.batcher.worker
    worker.get_loop().call_soon_threadsafe(worker.cancel)


def test_a_dead_batcher_makes_the_replica_unready(tiny_checkpoint):
    with running_server(server_settings(tiny_checkpoint)) as server, server.client() as client:
        assert client.get("/readyz").status_code == 200
        kill_the_batcher(server)
        deadline = time.monotonic() + 10
        while client.get("/readyz").status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ready = client.get("/readyz").json()
        assert ready["ready"] is False and ready["model"] is False
        assert "forward-pass worker" in ready["detail"]
        assert metric_value(client.get("/metrics").text, "cllm4rec_batcher_alive") == 0
        assert client.get("/healthz").status_code == 200


def test_cllm4rec_serve_exits_when_its_batcher_dies(tiny_checkpoint):
    """The server of `cllm4rec serve` stops on its own and reports the failure (exit status 1 there),
    so that Kubernetes restarts the container."""
    running = start_server(server_settings(tiny_checkpoint), server_class=Server)
    try:
        kill_the_batcher(running)
        running.thread.join(30)
        assert not running.thread.is_alive(), "the server kept running without its batcher"
        assert running.server.fatal and running.app.state.shutting_down
    finally:
        if running.thread.is_alive():
            running.stop()
