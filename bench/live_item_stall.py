"""What adding items costs the requests being served: concurrency-1 recommendations while items are POSTed.

    python bench/live_item_stall.py --checkpoint runs/beauty-cpu [--items 3] [--every 3]

Serves the checkpoint (`cllm4rec serve`, Redis under a key prefix of its own, defaults otherwise), sends
POST /recommend requests one after another (known users, stored histories, k = 10) and meanwhile POSTs
--items new items by their titles, one every --every seconds; prints how long each POST /items took and
the recommendation latencies: median, maximum and how many took over 100 ms. A replica adds a new item to
its model between forward passes (ServedModel.add_live_items): what that takes, a request waits.
docs/benchmarks.md ("Live items without a stall") records the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from pathlib import Path

import httpx

from serve_latency import MS, Connection
from serve_process import serving, trained_users

SLOW_MS = 100


async def drive(url: str, users: list[str], n_items: int, every_s: float) -> None:
    connection = await Connection.open(url)
    latencies: list[float] = []

    async def add_items() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            for i in range(n_items):
                await asyncio.sleep(every_s)
                started = time.perf_counter()
                response = await client.post("/items", json={"item_id": f"bench-live-{uuid.uuid4().hex[:8]}",
                                                             "title": f"a new red lipstick, shade {i}"})
                print(f"POST /items {response.status_code} in {MS * (time.perf_counter() - started):.0f} ms",
                      flush=True)

    adding = asyncio.create_task(add_items())
    user = 0
    try:
        while not adding.done():
            started = time.perf_counter()
            status, body = await connection.post_json("/recommend", {"user_id": users[user % len(users)], "k": 10})
            latencies.append(time.perf_counter() - started)
            if status != 200:
                raise RuntimeError(f"{status}: {body.decode()}")
            user += 1
        await adding
    finally:
        connection.close()
    print(f"{len(latencies)} recommendations meanwhile: median {MS * statistics.median(latencies):.1f} ms, "
          f"max {MS * max(latencies):.1f} ms, {sum(MS * latency > SLOW_MS for latency in latencies)} over {SLOW_MS} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--items", type=int, default=3, help="items added")
    parser.add_argument("--every", type=float, default=3.0, help="seconds before each item is added")
    parser.add_argument("--port", type=int, default=8781)
    args = parser.parse_args()
    users = trained_users(args.checkpoint)
    with serving(args.checkpoint.resolve(), args.port, {}, args.redis_url):
        asyncio.run(drive(f"http://127.0.0.1:{args.port}", users, args.items, args.every))


if __name__ == "__main__":
    main()
