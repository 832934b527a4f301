"""Overload soak: POST /recommend sent open-loop above the server's capacity, bounded in time and count.

    python bench/soak.py --checkpoint runs/quickstart/checkpoint [--factor 2.5] [--duration 30] [--queue-size 16]

1. Starts `cllm4rec serve` on 127.0.0.1 (in-process history store, a small CLLM4REC_QUEUE_SIZE).
2. Measures its capacity: --concurrency clients back to back for a few seconds (requests/s).
3. Warms up at the soak rate for a second, reads the server's RSS, then sends requests open-loop at
   --factor x capacity for --duration seconds, at most --max-requests: each request leaves on its
   schedule whether or not earlier ones were answered, as independent users' requests arrive.
4. Reports sent, ok (200), shed (503, the full queue), failed (anything else: another status, a
   client error or timeout), p50/p99 of the accepted requests, and the server's RSS before and after.
   Exits 1 if any request failed. Only loopback is ever a target; the run stops by itself.

tests/service/test_serve_overload.py runs open_loop against a test server (docs/benchmarks.md has
the figures of this script).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the server does (service/__init__.py), before torch

import argparse  # noqa: E402  (the imports below come after the environment is set)
import asyncio
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import psutil

from serve_process import serving

MS = 1000.0


@dataclass
class SoakResult:
    sent: int = 0
    ok: int = 0
    shed: int = 0
    failed: int = 0
    failures: Counter = field(default_factory=Counter)  # what the failed requests got
    accepted_latencies_s: list[float] = field(default_factory=list)
    duration_s: float = 0.0
    send_lag_s: float = 0.0  # how late the generator sent its most delayed request (keeping up: near 0)

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.accepted_latencies_s, q)) * MS if self.accepted_latencies_s else float("nan")

    def summary(self) -> dict:
        return {"sent": self.sent, "ok": self.ok, "shed": self.shed, "failed": self.failed,
                "failures": dict(self.failures), "p50_ms": round(self.percentile_ms(50), 1),
                "p99_ms": round(self.percentile_ms(99), 1), "sent_per_s": round(self.sent / self.duration_s, 1),
                "ok_per_s": round(self.ok / self.duration_s, 1), "send_lag_ms": round(self.send_lag_s * MS, 1)}


class Connections:
    """Keep-alive HTTP/1.1 connections to one server, and POST over them: a minimal client whose cost
    per request is a fraction of httpx's, so that a generator sharing the server's CPUs can still
    send faster than the server answers (with httpx, the generator itself was the bottleneck)."""

    # Reused only this long after their last response: the server closes a keep-alive connection idle
    # for 5 s (uvicorn's default), and a request sent on it as it closes would be lost.
    REUSE_WITHIN_S = 2.0

    def __init__(self, url: str):
        parsed = urlsplit(url)
        self.host, self.port = parsed.hostname, parsed.port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []  # (..., idle since)

    async def connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        now = asyncio.get_running_loop().time()
        while self.idle:
            reader, writer, since = self.idle.pop()
            if now - since < self.REUSE_WITHIN_S and not reader.at_eof():
                return reader, writer
            writer.close()
        return await asyncio.open_connection(self.host, self.port)

    async def post(self, path: str, body: bytes) -> int:
        """The response's status code; raises OSError or asyncio.IncompleteReadError."""
        reader, writer = await self.connection()
        try:
            writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (path.encode(), self.host.encode(), len(body), body))
            status = int((await reader.readline()).split()[1])
            length, close = 0, False
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                name, value = name.strip().lower(), value.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection":
                    close = value == b"close"
            await reader.readexactly(length)
        except BaseException:
            writer.close()
            raise
        if close:
            writer.close()
        else:
            self.idle.append((reader, writer, asyncio.get_running_loop().time()))
        return status

    def close(self) -> None:
        for _, writer, _ in self.idle:
            writer.close()
        self.idle.clear()


async def open_loop(url: str, bodies: list[dict], rate: float, duration_s: float, max_requests: int,
                    timeout_s: float = 30.0) -> SoakResult:
    """min(rate x duration, max_requests) POST /recommend, request i sent at i / rate seconds. Every
    request that finds no idle connection opens one, so none waits in the client for another."""
    result = SoakResult()
    n = min(max_requests, int(rate * duration_s))
    payloads = [json.dumps(body).encode() for body in bodies]
    connections = Connections(url)
    loop = asyncio.get_running_loop()

    async def one(payload: bytes) -> None:
        started = loop.time()
        try:
            status = await asyncio.wait_for(connections.post("/recommend", payload), timeout_s)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, IndexError) as e:
            result.failed += 1
            result.failures[type(e).__name__] += 1
            return
        if status == 200:
            result.ok += 1
            result.accepted_latencies_s.append(loop.time() - started)
        elif status == 503:
            result.shed += 1
        else:
            result.failed += 1
            result.failures[str(status)] += 1

    tasks = []
    start = loop.time()
    try:
        for i in range(n):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                result.send_lag_s = max(result.send_lag_s, -delay)
            tasks.append(asyncio.create_task(one(payloads[i % len(payloads)])))
            result.sent += 1
        await asyncio.gather(*tasks)
    finally:
        connections.close()
    result.duration_s = loop.time() - start
    return result


async def closed_loop(url: str, bodies: list[dict], concurrency: int, duration_s: float) -> float:
    """Requests/s answered 200 with `concurrency` clients sending back to back: the capacity."""
    done = 0
    payloads = [json.dumps(body).encode() for body in bodies]
    connections = Connections(url)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + duration_s

    async def client_loop(offset: int) -> None:
        nonlocal done
        i = offset
        while loop.time() < deadline:
            status = await connections.post("/recommend", payloads[i % len(payloads)])
            done += status == 200  # after the await: `done += await ...` would read `done` before it
            i += concurrency
    started = loop.time()
    try:
        await asyncio.gather(*(client_loop(c) for c in range(concurrency)))
    finally:
        connections.close()
    return done / (loop.time() - started)


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


# --- the script ------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--factor", type=float, default=2.5, help="soak rate as a multiple of the measured capacity")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of open-loop traffic")
    parser.add_argument("--max-requests", type=int, default=20_000, help="a cap on the requests sent")
    parser.add_argument("--queue-size", type=int, default=16, help="CLLM4REC_QUEUE_SIZE of the server")
    parser.add_argument("--max-batch-size", type=int, default=8, help="CLLM4REC_MAX_BATCH_SIZE of the server")
    parser.add_argument("--concurrency", type=int, default=16, help="clients of the capacity measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (1: a CPU is left for "
                        "the server's event loop and this generator)")
    parser.add_argument("--port", type=int, default=8766)
    args = parser.parse_args()

    ids = json.loads((args.checkpoint / "ids.json").read_text())["users"]
    bodies = [{"user_id": user_id, "k": 10} for user_id in ids]
    url = f"http://127.0.0.1:{args.port}"
    print(f"load average {os.getloadavg()[0]:.2f} at start; {os.cpu_count()} CPUs; checkpoint {args.checkpoint}; "
          f"server queue {args.queue_size}, max batch {args.max_batch_size}, {args.threads} torch threads")
    with serving(args.checkpoint, args.port, {
            "CLLM4REC_TORCH_THREADS": str(args.threads), "CLLM4REC_QUEUE_SIZE": str(args.queue_size),
            "CLLM4REC_MAX_BATCH_SIZE": str(args.max_batch_size), "CLLM4REC_LOG_LEVEL": "warning"}) as server:
        capacity = asyncio.run(closed_loop(url, bodies, args.concurrency, 5.0))
        rate = args.factor * capacity
        print(f"capacity {capacity:.1f} requests/s (closed loop, {args.concurrency} clients); "
              f"soak at {rate:.1f} requests/s for {args.duration:g} s, at most {args.max_requests} requests")
        asyncio.run(open_loop(url, bodies, rate, 1.0, args.max_requests))  # warm-up at the soak rate
        rss_before = rss_mib(server.pid)
        result = asyncio.run(open_loop(url, bodies, rate, args.duration, args.max_requests))
        rss_after = rss_mib(server.pid)
    summary = result.summary()
    summary.update(capacity_per_s=round(capacity, 1), rss_before_mib=round(rss_before, 1),
                   rss_after_mib=round(rss_after, 1))
    print(json.dumps(summary))
    print(f"sent {result.sent}, ok {result.ok}, shed (503) {result.shed}, failed {result.failed}; accepted p50 "
          f"{summary['p50_ms']} ms, p99 {summary['p99_ms']} ms; server RSS {rss_before:.1f} -> {rss_after:.1f} MiB; "
          f"load average {os.getloadavg()[0]:.2f} at the end")
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
