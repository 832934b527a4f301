"""Overload: open-loop traffic at 2.5x the server's capacity, over loopback HTTP, for a fixed time and
request count (bench/soak.py's generator). The server sheds the excess with 503, nothing else fails,
the accepted requests keep a p99 bounded by the queue, and memory stays flat.

The forward pass is slowed to a known 50 ms here (serving_helpers.slow_down), so the capacity is
known and low (2 requests per pass: 40 requests/s) and the generator, in this same process on a
shared 2-core machine, can outrun it; bench/soak.py does the same against `cllm4rec serve` with a
real model."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
from pathlib import Path

import pytest

from serving_helpers import running_server, server_settings, slow_down

sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
from soak import open_loop, rss_mib  # noqa: E402

FORWARD_S = 0.05
SETTINGS = dict(max_batch_size=2, queue_size=8, max_wait_ms=0.0, request_timeout_s=5.0)
CAPACITY = SETTINGS["max_batch_size"] / FORWARD_S  # requests/s
RATE = 2.5 * CAPACITY
DURATION_S = 8.0


@pytest.mark.timeout(120)
def test_overload_is_shed_with_503_and_memory_stays_flat(tiny_checkpoint, offline):
    bodies = [{"user_id": user_id, "k": 10} for user_id in offline.checkpoint.user_ids]
    with running_server(server_settings(tiny_checkpoint, **SETTINGS)) as server:
        slow_down(server, FORWARD_S)
        asyncio.run(open_loop(server.url, bodies, RATE, 1.0, max_requests=1000))  # first connections, allocations
        gc.collect()
        rss_before = rss_mib(os.getpid())
        result = asyncio.run(open_loop(server.url, bodies, RATE, DURATION_S, max_requests=1000))
        gc.collect()
        rss_after = rss_mib(os.getpid())
    summary = result.summary()
    print(f"\noverload at {RATE:g}/s for {DURATION_S:g} s against a capacity of {CAPACITY:g}/s: {summary}, "
          f"RSS {rss_before:.1f} -> {rss_after:.1f} MiB")
    assert result.sent == int(RATE * DURATION_S)
    assert result.failed == 0, result.failures
    assert result.shed > 0.3 * result.sent  # about 60% is the excess over capacity
    assert result.ok >= 0.5 * CAPACITY * result.duration_s  # and the server kept serving meanwhile
    # An accepted request waits for at most the queue ahead of it, in passes of max_batch_size, then
    # its own pass; three times that (a busy machine) plus HTTP, and below the request timeout.
    passes = SETTINGS["queue_size"] / SETTINGS["max_batch_size"] + 1
    bound_s = min(3 * passes * FORWARD_S + 0.5, SETTINGS["request_timeout_s"])
    assert result.percentile_ms(99) / 1000 < bound_s, summary
    assert rss_after - rss_before < 30, (rss_before, rss_after)  # MiB: this process holds server and client
