"""/healthz latency while the server is flooded with big batch requests (k = 1000).

    python bench/probe_latency.py --checkpoint CHECKPOINT [--clients 4] [--seconds 30]

Starts `cllm4rec serve` (in-process history store, seeded from the checkpoint), measures /healthz
every 20 ms for a few seconds at rest, then while --clients clients send POST /recommend/batch with
--users known users (default 32, one forward pass) at k = 1000 back to back, and prints one JSON object:
/healthz p50 / p99 / max at rest and under the flood, and the batch requests answered. The probes
share the server's event loop with the answers being built and serialised: a stall shows in their
p99 and max. The flood runs in a process of its own, so its clients do not delay the probe's loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import socket
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from model.checkpoint import read_checkpoint
from serve_process import start_serve

PROBE_INTERVAL_S = 0.02


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_ms": round(statistics.median(ordered) * 1000, 2),
            "p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))] * 1000, 2),
            "max_ms": round(ordered[-1] * 1000, 2), "probes": len(ordered)}


async def probe(client: httpx.AsyncClient, until: float) -> list[float]:
    latencies = []
    while time.monotonic() < until:
        started = time.perf_counter()
        response = await client.get("/healthz")
        response.raise_for_status()
        latencies.append(time.perf_counter() - started)
        await asyncio.sleep(PROBE_INTERVAL_S)
    return latencies


async def flood(url: str, body: dict, clients: int, until: float) -> int:
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients)) as client:
        async def one_client() -> int:
            answered = 0
            while time.monotonic() < until:
                response = await client.post("/recommend/batch", json=body)
                response.raise_for_status()
                answered += 1
            return answered
        return sum(await asyncio.gather(*(one_client() for _ in range(clients))))


def flood_process(url: str, body: dict, clients: int, seconds: float, answered) -> None:
    answered.value = asyncio.run(flood(url, body, clients, time.monotonic() + seconds))


async def probe_for(url: str, seconds: float) -> list[float]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as prober:
        return await probe(prober, time.monotonic() + seconds)


def measure(url: str, users: list[str], args) -> dict:
    rng = random.Random(0)
    body = {"requests": [{"user_id": rng.choice(users), "k": args.k} for _ in range(args.users)]}
    at_rest = asyncio.run(probe_for(url, 5))
    # The flood from a process of its own: its clients' work must not delay the probe's own loop.
    answered = multiprocessing.Value("i", 0)
    flooder = multiprocessing.Process(target=flood_process, args=(url, body, args.clients, args.seconds, answered))
    flooder.start()
    time.sleep(1)  # the flood is under way
    under_flood = asyncio.run(probe_for(url, args.seconds - 1))
    flooder.join()
    return {"at_rest": percentiles(at_rest), "under_flood": percentiles(under_flood),
            "batch_requests_answered": answered.value, "clients": args.clients, "users_per_batch": args.users,
            "seconds": args.seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--users", type=int, default=32, help="users per batch request")
    parser.add_argument("-k", type=int, default=1000, help="items per user")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--threads", type=int, default=2, help="CLLM4REC_TORCH_THREADS of the server")
    args = parser.parse_args()
    users = read_checkpoint(args.checkpoint).user_ids
    port = free_port()
    log = Path(tempfile.mkdtemp()) / "server.log"
    server = start_serve(args.checkpoint, port, {"CLLM4REC_TORCH_THREADS": str(args.threads),
                                                 "CLLM4REC_REQUEST_TIMEOUT_S": "120",
                                                 "CLLM4REC_LOG_LEVEL": "warning"}, log)
    try:
        print(json.dumps(measure(f"http://127.0.0.1:{port}", users, args)))
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
