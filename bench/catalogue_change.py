"""What one change of the live catalogue costs each replica: the re-read (Catalogue.refresh) after it.

    python bench/catalogue_change.py --live 10000 --retired 10000 [--redis-url redis://127.0.0.1:6379/0]

Stores --live items added live and --retired retired ids under a key prefix of its own (the catalogue's
Redis keys, service/catalogue.py), reads them once as a replica does at its first request, then --changes
times: retires one more item (as DELETE /items does: SADD and INCR of the version) and times the replica's
re-read on the event loop; then the same for an item added live (HSETNX and INCR). Prints the median
milliseconds of each. The keys are deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid

import redis

from service.catalogue import LIVE_KEY, RETIRED_KEY, VERSION_KEY, Catalogue
from service.histories import RedisHistoryStore


async def refresh_times(url: str, prefix: str, changes: int, change) -> float:
    """Median ms of a replica's re-read after each of `changes` calls of change(i)."""
    store = RedisHistoryStore(url, prefix, max_length=200, timeout_s=30.0)
    catalogue = Catalogue(store)
    try:
        await catalogue.refresh()  # the replica's first read
        times = []
        for i in range(changes):
            change(i)
            started = time.perf_counter()
            await catalogue.refresh()
            times.append(time.perf_counter() - started)
    finally:
        await store.close()
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--live", type=int, default=10_000, help="items added live before")
    parser.add_argument("--retired", type=int, default=10_000, help="items retired before")
    parser.add_argument("--changes", type=int, default=20)
    args = parser.parse_args()
    client = redis.Redis.from_url(args.redis_url, decode_responses=True)
    prefix = f"cllm4rec-bench-{uuid.uuid4().hex[:8]}:"
    record = json.dumps({"title": "a live item", "description": "a description of some ten words or so"})
    try:
        if args.live:
            client.hset(prefix + LIVE_KEY, mapping={f"live-{i}": record for i in range(args.live)})
        if args.retired:
            client.sadd(prefix + RETIRED_KEY, *[f"item-{i}" for i in range(args.retired)])

        def retire(i: int) -> None:
            client.pipeline().sadd(prefix + RETIRED_KEY, f"retired-now-{i}").incr(prefix + VERSION_KEY).execute()

        def add(i: int) -> None:
            client.pipeline().hsetnx(prefix + LIVE_KEY, f"added-now-{i}", record).incr(prefix + VERSION_KEY).execute()

        after_retirement = asyncio.run(refresh_times(args.redis_url, prefix, args.changes, retire))
        after_addition = asyncio.run(refresh_times(args.redis_url, prefix, args.changes, add))
        print(json.dumps({"live_items": args.live, "retired_items": args.retired,
                          "refresh_after_a_retirement_ms": round(after_retirement, 2),
                          "refresh_after_an_addition_ms": round(after_addition, 2)}))
    finally:
        for key in (LIVE_KEY, RETIRED_KEY, VERSION_KEY):
            client.delete(prefix + key)


if __name__ == "__main__":
    main()
