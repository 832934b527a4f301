"""What retired items cost a recommendation: concurrency-1 latency with more and more of the catalogue retired.

    python bench/retired_items.py --checkpoint runs/big --retired 0 1000 10000 [--rev HEAD~1 --rev .]

Each --rev (a git revision, or . for this working tree; default .) serves the checkpoint with `cllm4rec serve`
(as bench/overhead_ab.py does), all of them as replicas of one deployment: one Redis key prefix, seeded from
the checkpoint, deleted at the end. For each count N, N random items of the checkpoint's catalogue are
retired as DELETE /items does it (the catalogue's Redis keys, service/catalogue.py: the retired set
replaced, the version incremented), a first request lets every server re-read the catalogue, and then
--rounds rounds of --block concurrency-1 POST /recommend (known users with training items, stored
histories, k = 10) go to every server in turn. Prints the median latency per server and count.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the server does (service/__init__.py), before torch

import argparse  # noqa: E402  (the imports below come after the environment is set)
import asyncio
import contextlib
import statistics
import tempfile
import uuid
from pathlib import Path

import numpy as np
import redis

from model.checkpoint import read_checkpoint
from overhead_ab import check_out, remove_worktrees
from serve_latency import MS, load
from serve_process import delete_keys, serving, trained_users
from service.catalogue import RETIRED_KEY, VERSION_KEY


def retire(client: redis.Redis, prefix: str, item_ids: list[str]) -> None:
    """The catalogue's retired ids become exactly `item_ids`, in one change."""
    pipe = client.pipeline(transaction=True)
    pipe.delete(prefix + RETIRED_KEY)
    if item_ids:
        pipe.sadd(prefix + RETIRED_KEY, *item_ids)
    pipe.incr(prefix + VERSION_KEY)
    pipe.execute()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--retired", type=int, nargs="+", default=[0, 1000, 10000], help="items retired, in turn")
    parser.add_argument("--rev", action="append", help="a git revision, or . (repeat; default: .)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--block", type=int, default=100, help="requests to each server per round")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of each server")
    parser.add_argument("--port", type=int, default=8860, help="the first server's; the others' follow")
    args = parser.parse_args()
    revisions = args.rev or ["."]
    catalogue = read_checkpoint(args.checkpoint, scoring_only=True).item_ids
    if max(args.retired) >= len(catalogue):
        parser.error(f"--retired: the checkpoint has {len(catalogue)} items; retire fewer")
    users = trained_users(args.checkpoint)
    rng = np.random.default_rng(0)
    client = redis.Redis.from_url(args.redis_url, decode_responses=True)
    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    settings = {"CLLM4REC_TORCH_THREADS": str(args.threads), "CLLM4REC_REDIS_URL": args.redis_url,
                "CLLM4REC_REDIS_KEY_PREFIX": prefix}
    medians: list[list[float]] = []  # per count in turn, per server
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as servers:
        servers.callback(delete_keys, args.redis_url, prefix)  # after the servers have stopped
        trees: list[Path] = []
        servers.callback(remove_worktrees, trees)
        urls = []
        for i, revision in enumerate(revisions):
            source = check_out(revision, Path(tmp) / f"rev-{i}")
            trees.append(source)
            servers.enter_context(serving(args.checkpoint.resolve(), args.port + i, settings, source=source))
            urls.append(f"http://127.0.0.1:{args.port + i}")
        for count in args.retired:
            retire(client, prefix, [str(item_id) for item_id in rng.choice(catalogue, count, replace=False)])
            latencies: list[list[float]] = [[] for _ in urls]
            for url in urls:  # each server re-reads the catalogue once, then warms up
                asyncio.run(load(url, [{"user_id": user, "k": 10} for user in users[:16]], 1))
            for round_ in range(args.rounds):
                for i in list(range(len(urls)))[:: 1 if round_ % 2 == 0 else -1]:
                    bodies = [{"user_id": user, "k": 10} for user in rng.choice(users, args.block)]
                    latencies[i] += asyncio.run(load(urls[i], bodies, 1))[0]
            medians.append([MS * statistics.median(server_latencies) for server_latencies in latencies])
    print(f"{args.checkpoint} ({len(catalogue)} items): median ms of {args.rounds * args.block} concurrency-1 "
          "requests to each server")
    print(f"{'retired items':>14} " + " ".join(f"{revision:>14}" for revision in revisions))
    for count, row in zip(args.retired, medians):
        print(f"{count:>14} " + " ".join(f"{median:>14.2f}" for median in row))


if __name__ == "__main__":
    main()
