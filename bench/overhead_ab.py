"""What HTTP, Redis and batching add to a lone request, for two or more versions of the server side by side.

    python bench/overhead_ab.py --checkpoint runs/quickstart/checkpoint --rev HEAD~1 --rev .

Each --rev (a git revision, or . for this working tree) is checked out into a temporary worktree and
served by a `cllm4rec serve` of its own (the same checkpoint and defaults as bench/serve_latency.py; the
same Redis, under a key prefix of its own, seeded from the checkpoint and deleted at the end). Then
--rounds rounds, each sending --block concurrency-1 POST /recommend requests (known users with
training items, stored histories, k = 10) to every server in turn, the order reversed every other round.
A block's overhead is the client's mean latency minus the server's mean time in the forward pass
(its cllm4rec_model_forward_duration_seconds histogram: the pass, masking and top-k), so what is left is
the HTTP stack, Redis and the batcher, with the forward pass's own drift taken out. Prints, per
revision, the median over the rounds, their spread, and the median latency and forward time.
--minimal adds bench/minimal_server.py of this working tree as one more server: the least a Python
server with the history in Redis adds around the same pass on this machine.

Why side by side: this VM's speed drifts by up to a fifth within a minute, more than the differences
measured (docs/benchmarks.md, "Overhead at 4 layers"). Run it with nothing else busy.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the server does (service/__init__.py), before torch

import argparse  # noqa: E402  (the imports below come after the environment is set)
import asyncio
import contextlib
import statistics
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from serve_latency import MS, load, server_sums
from serve_process import MINIMAL_SERVER_ENTRY, serving, trained_users

REPOSITORY = Path(__file__).resolve().parent.parent


def check_out(revision: str, into: Path) -> Path:
    """A worktree of `revision` (this working tree itself for ".")."""
    if revision == ".":
        return REPOSITORY
    subprocess.run(["git", "-C", str(REPOSITORY), "worktree", "add", "--detach", "--quiet", str(into), revision],
                   check=True)
    return into


def remove_worktrees(trees: list[Path]) -> None:
    for tree in trees:
        if tree != REPOSITORY:
            subprocess.run(["git", "-C", str(REPOSITORY), "worktree", "remove", "--force", str(tree)], check=False)


def block(url: str, bodies: list[dict]) -> tuple[float, float, float]:
    """(overhead, median latency, mean forward time) of one block of concurrency-1 requests, in ms."""
    before = server_sums(url)
    latencies, _ = asyncio.run(load(url, bodies, 1))
    forward = (server_sums(url)["forward_ms"] - before["forward_ms"]) / len(bodies)
    return MS * (statistics.mean(latencies) - forward), MS * statistics.median(latencies), MS * forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--rev", action="append", required=True,
                        help="a git revision, or . (repeat: two or more, or one with --minimal)")
    parser.add_argument("--minimal", action="store_true", help="and bench/minimal_server.py beside them")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--block", type=int, default=100, help="requests to each server per round")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of each server")
    parser.add_argument("--port", type=int, default=8770, help="the first server's; the others' follow")
    args = parser.parse_args()
    if len(args.rev) + args.minimal < 2:
        parser.error("compare two or more --rev, or one with --minimal")
    names = [*args.rev, *(["minimal"] if args.minimal else [])]
    users = trained_users(args.checkpoint)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as servers:
        trees = []
        servers.callback(remove_worktrees, trees)  # after the servers have stopped
        urls = []
        for i, name in enumerate(names):
            minimal = i == len(args.rev)  # the one after the revisions
            source = REPOSITORY if minimal else check_out(name, Path(tmp) / f"rev-{i}")
            trees.append(source)
            port = args.port + i
            servers.enter_context(serving(args.checkpoint.resolve(), port,
                                          {"CLLM4REC_TORCH_THREADS": str(args.threads)}, args.redis_url, source,
                                          **({"entry": MINIMAL_SERVER_ENTRY} if minimal else {})))
            urls.append(f"http://127.0.0.1:{port}")
        results: list[list[tuple[float, float, float]]] = [[] for _ in urls]
        for url in urls:  # warm the connections and caches
            asyncio.run(load(url, [{"user_id": user, "k": 10} for user in users[:16]], 1))
        for round_ in range(args.rounds):
            order = list(range(len(urls)))[:: 1 if round_ % 2 == 0 else -1]
            for i in order:
                bodies = [{"user_id": user, "k": 10} for user in rng.choice(users, args.block)]
                results[i].append(block(urls[i], bodies))
    print(f"{args.checkpoint}: {args.rounds} rounds of {args.block} concurrency-1 requests to each server in turn")
    print(f"{'revision':>24} {'overhead ms (median)':>21} {'spread (min-max)':>22} {'p50 ms':>8} {'forward ms':>11}")
    for revision, rows in zip(names, results):
        overheads = sorted(row[0] for row in rows)
        print(f"{revision:>24} {statistics.median(overheads):>21.3f} "
              f"{f'{overheads[0]:.2f}-{overheads[-1]:.2f}':>22} {statistics.median(r[1] for r in rows):>8.2f} "
              f"{statistics.median(r[2] for r in rows):>11.2f}")


if __name__ == "__main__":
    main()
