"""`cllm4rec serve` in a process of its own, for the benchmarks that drive it over HTTP."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import redis

from model.checkpoint import read_checkpoint

READY_TIMEOUT_S = 300  # a cold backbone conversion takes about a minute on 2 CPUs
SERVE_ENTRY = ("-m", "service.cli")
# bench/minimal_server.py: the same request answered with nothing but the model, uvicorn and one Redis read
MINIMAL_SERVER_ENTRY = (str(Path(__file__).resolve().with_name("minimal_server.py")),)


@contextlib.contextmanager
def serving(checkpoint: Path, port: int, settings: dict[str, str], redis_url: str | None = None,
            source: Path | None = None, entry: tuple[str, ...] = SERVE_ENTRY) -> Iterator[subprocess.Popen]:
    """start_serve with its log in a temporary folder and, given redis_url, that Redis under a key prefix of
    its own; on leaving, stop_serve and the prefix's keys deleted."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    store = {"CLLM4REC_REDIS_URL": redis_url, "CLLM4REC_REDIS_KEY_PREFIX": prefix} if redis_url else {}
    with tempfile.TemporaryDirectory() as tmp:
        process = start_serve(checkpoint, port, {**store, **settings}, Path(tmp) / "server.log", source, entry)
        try:
            yield process
        finally:
            stop_serve(process)
            if redis_url:
                delete_keys(redis_url, prefix)


def trained_users(checkpoint: Path) -> list[str]:
    """The ids of the checkpoint's users with training items (histories to recommend from once seeded)."""
    read = read_checkpoint(checkpoint, scoring_only=True)
    return [read.user_ids[u] for u, items in enumerate(read.split.train) if len(items)]


def start_serve(checkpoint: Path, port: int, settings: dict[str, str], log_path: Path,
                source: Path | None = None, entry: tuple[str, ...] = SERVE_ENTRY) -> subprocess.Popen:
    """The server on 127.0.0.1:port with these CLLM4REC_* settings (none taken from this environment
    but the backbone cache), returned once /readyz answers 200; `source`: a checkout whose code it runs
    (default: this one); `entry`: Python's arguments before `serve ...` (a script that patches the server
    first, bench/fixed_cost.py). Exits the benchmark with the server's log if the server dies, or after
    READY_TIMEOUT_S."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLLM4REC_") or k == "CLLM4REC_CACHE_DIR"}
    env.update(settings)
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, *entry, "serve", "--checkpoint", str(checkpoint),
                                    "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, cwd=source)  # -m imports from its directory first
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if process.poll() is not None:
            sys.exit(f"the server exited; its log:\n{log_path.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            sys.exit(f"the server did not become ready in {READY_TIMEOUT_S} s")
        time.sleep(0.5)


def stop_serve(process: subprocess.Popen) -> None:
    """SIGTERM, as Kubernetes stops a pod, then wait for the drain to finish."""
    process.send_signal(signal.SIGTERM)
    process.wait(60)


def delete_keys(redis_url: str, prefix: str) -> None:
    """Delete the benchmark's keys (its key prefix) from the shared Redis, a thousand at a time."""
    store = redis.Redis.from_url(redis_url)
    keys = list(store.scan_iter(match=prefix + "*", count=1000))
    for start in range(0, len(keys), 1000):
        store.delete(*keys[start : start + 1000])
