"""Helpers of the server tests: a real uvicorn serving the app on a free port (in a thread of the
test process), reading /metrics, the offline scorer the answers are compared with, and a
redis-server of a test's own. (A module of its own name, not conftest: test modules import it.)"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from model.checkpoint import EMBEDDINGS_FILE, META_FILE, Recommender, read_checkpoint, save_tensors, sha256_file
from model.cllm4rec import score_prompts
from model.prompts import build_recommend_prompt
from service.app import create_app
from service.settings import Settings

REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass
class RunningServer:
    url: str
    app: object
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def engine(self):
        return self.app.state.engine

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "the server did not stop within 30 s"


def start_server(settings: Settings, server_class=uvicorn.Server) -> RunningServer:
    """uvicorn on an already bound loopback socket (no port race), lifespan run, in a thread."""
    app = create_app(settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=10)
    server = server_class(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start (see the log above)")
        time.sleep(0.02)
    return RunningServer(f"http://127.0.0.1:{sock.getsockname()[1]}", app, server, thread)


@contextlib.contextmanager
def running_server(settings: Settings, server_class=uvicorn.Server):
    running = start_server(settings, server_class)
    try:
        yield running
    finally:
        running.stop()


SERVER_THREADS = 1  # the test servers' torch threads; the offline scorer uses as many (same float sums)


def slow_down(server: RunningServer, seconds: float) -> None:
    """Every forward pass of the server takes `seconds` longer (a stand-in for a big model)."""
    batcher = server.engine.batcher
    run_batch = batcher.run_batch

    def slow(jobs):
        time.sleep(seconds)
        return run_batch(jobs)
    batcher.run_batch = slow


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    """Until /readyz of a server process answers 200; fails if the process exits first."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert process.poll() is None, f"the server exited with {process.returncode}"
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not become ready"
        time.sleep(0.2)


def server_settings(checkpoint: Path, **overrides) -> Settings:
    """Settings for a test server; the environment of the machine running the tests is ignored."""
    # float32: the tests compare served scores with the offline (float32) scorer exactly; the bfloat16
    # backbone that CLLM4REC_DTYPE=auto may choose on a CPU with bf16 units has its own tests.
    defaults = dict(checkpoint=checkpoint, torch_threads=SERVER_THREADS, redis_url=None, max_wait_ms=0.0,
                    dtype="float32")
    return Settings(**{**defaults, **overrides})


def metric_value(text: str, name: str, **labels) -> float:
    """A sample's value in a /metrics page (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def offline_ranking(offline: Recommender, user: int | None, history: list[int], k: int, exclude: list[int]):
    """(item ids, scores) of the offline scorer: score_prompts on the trainer's prompt, masked, top-k."""
    prompt = build_recommend_prompt(offline.space, user, history, offline.max_history)
    threads = torch.get_num_threads()
    torch.set_num_threads(SERVER_THREADS)
    try:
        scores = score_prompts(offline.model, [prompt])[0]
    finally:
        torch.set_num_threads(threads)
    scores[exclude] = -torch.inf
    values, indices = torch.topk(scores, k)
    return [offline.checkpoint.item_ids[i] for i in indices.tolist()], values.tolist()


def variant_checkpoint(source: Path, target: Path, scale: float) -> str:
    """A copy of a checkpoint with its token embeddings scaled: another valid model (other scores,
    another model_version) for reload tests, without training one. Returns its model_version."""
    shutil.copytree(source, target)
    tables = {name: tensor * scale for name, tensor in read_checkpoint(source).embeddings.items()}
    save_tensors(target / EMBEDDINGS_FILE, tables)
    meta = json.loads((target / META_FILE).read_text())
    meta["files"][EMBEDDINGS_FILE] = sha256_file(target / EMBEDDINGS_FILE)
    meta["model_version"] = f"variant-{scale:g}-{meta['files'][EMBEDDINGS_FILE][:8]}"
    (target / META_FILE).write_text(json.dumps(meta))
    return meta["model_version"]


def redis_or_fail() -> redis.Redis:
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail("the service tests need Redis on 127.0.0.1:6379 (README, 'Tests')")
    return client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OwnRedis:
    """A redis-server of the test's own (never the shared one), to stop, crash and start at will.
    persistent: an append-only file, fsynced on every write (`fsync="always"`) or once a second
    (`"everysec"`, the deployed setting)."""

    def __init__(self, directory: Path, persistent: bool = False, fsync: str = "always"):
        self.port = free_port()
        self.directory = directory
        self.persistent = persistent
        self.fsync = fsync
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        persistence = (["--appendonly", "yes", "--appendfsync", self.fsync] if self.persistent
                       else ["--appendonly", "no"])
        self.process = subprocess.Popen(
            [shutil.which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             *persistence, "--dir", str(self.directory)], stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except (redis.ConnectionError, redis.BusyLoadingError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def crash(self) -> None:
        """SIGKILL: no shutdown, nothing flushed beyond what was already on disk."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None
