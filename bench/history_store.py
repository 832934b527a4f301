"""Seeding and memory of the Redis history store at scale, on generated histories.

    python bench/history_store.py --users 1000000 --items-per-user 10 [--redis-url redis://127.0.0.1:6379/0]

Seeds N users' histories the way the server and `cllm4rec load-histories` do (RedisHistoryStore.seed:
one merge script per user, pipelined), times it, seeds again under another model version (the merge
pass of a rolling update over existing keys), and prints Redis's memory per user (used_memory
before and after, and MEMORY USAGE of sampled keys). Then times a recommendation's read
(RedisHistoryStore.get_beside: the users' histories and the catalogue's version in one round trip) for
1 and for 32 users, --reads times each, with redis-py's Python reply parser and with hiredis (its C
parser, which redis-py takes when installed). Everything goes under a key prefix of its own, deleted at
the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
import uuid

import statistics

import redis
from redis._parsers import _AsyncHiredisParser, _AsyncRESP3Parser

from service.catalogue import VERSION_KEY
from service.histories import RedisHistoryStore

# The reply parsers timed: redis-py's own, and hiredis's (the default when the package is installed).
PARSERS = {"python": _AsyncRESP3Parser, "hiredis": _AsyncHiredisParser}


def histories(users: int, items_per_user: int, catalogue: int, seed: int):
    rng = random.Random(seed)
    for user in range(users):
        yield f"user-{user}", [f"item-{rng.randrange(catalogue)}" for _ in range(items_per_user)]


async def seed(url: str, prefix: str, args, version: str) -> tuple[int, float]:
    store = RedisHistoryStore(url, prefix, args.max_length, timeout_s=5.0)
    started = time.perf_counter()
    try:
        written = await store.seed(histories(args.users, args.items_per_user, args.catalogue, args.seed), version)
    finally:
        await store.close()
    return written, time.perf_counter() - started


async def read_times(url: str, prefix: str, args, parser: type, users_per_read: int) -> float:
    """Median microseconds of a recommendation's read of `users_per_read` seeded users."""
    store = RedisHistoryStore(url, prefix, args.max_length, timeout_s=5.0)
    store.redis.connection_pool.connection_kwargs["parser_class"] = parser
    rng = random.Random(2)
    try:
        times = []
        for read in range(args.reads + args.reads // 10):  # the first tenth warms up
            user_ids = [f"user-{rng.randrange(args.users)}" for _ in range(users_per_read)]
            started = time.perf_counter()
            await store.get_beside(user_ids, prefix + VERSION_KEY)
            if read >= args.reads // 10:
                times.append(time.perf_counter() - started)
    finally:
        await store.close()
    return 1e6 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items-per-user", type=int, default=10)
    parser.add_argument("--catalogue", type=int, default=100_000, help="distinct item ids")
    parser.add_argument("--max-length", type=int, default=200, help="CLLM4REC_HISTORY_MAX_LENGTH")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reads", type=int, default=5000, help="timed reads per parser and size")
    args = parser.parse_args()

    client = redis.Redis.from_url(args.redis_url, decode_responses=True)
    prefix = f"cllm4rec-bench-{uuid.uuid4().hex[:8]}:"
    before = client.info("memory")["used_memory"]
    try:
        written, seconds = asyncio.run(seed(args.redis_url, prefix, args, "v1"))
        after = client.info("memory")["used_memory"]
        sample = [f"{prefix}history:user-{u}" for u in random.Random(1).sample(range(args.users), 1000)]
        per_key = sum(client.memory_usage(key) for key in sample) / len(sample)
        rewritten, merge_seconds = asyncio.run(seed(args.redis_url, prefix, args, "v2"))
        reads = {f"read_{size}_users_us_{name}": round(asyncio.run(read_times(args.redis_url, prefix, args, parser,
                                                                                size)))
                 for size in (1, 32) for name, parser in PARSERS.items()}
        print(json.dumps({
            "users": args.users, "items_per_user": args.items_per_user, "written": written,
            "seed_seconds": round(seconds, 1), "users_per_second": round(args.users / seconds),
            "second_version_seed_seconds": round(merge_seconds, 1), "second_version_rewritten": rewritten,
            "used_memory_bytes_per_user": round((after - before) / args.users),
            "memory_usage_bytes_per_key": round(per_key), **reads,
        }))
    finally:
        cursor = 0
        while True:
            cursor, keys = client.scan(cursor, match=prefix + "*", count=10_000)
            if keys:
                client.unlink(*keys)
            if cursor == 0:
                break


if __name__ == "__main__":
    main()
