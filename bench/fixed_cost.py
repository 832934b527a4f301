"""What a request costs the server outside the model: the same server with an instant model, at concurrency 1.

    python bench/fixed_cost.py --checkpoint runs/quickstart/checkpoint

Starts `cllm4rec serve` on the checkpoint with its scoring (ServedModel.score: the forward pass, masking
and top-k) replaced by a constant ranking, everything else as served: uvicorn, FastAPI, the middleware,
the key checks, the history read, the catalogue's version, the batcher (a lone request is scored on the
event loop's thread), the metrics, the response (--sleep-ms: the model sleeps that long first). Sends --requests concurrency-1 POST /recommend
(known users, stored histories, k = 10) in --rounds rounds, with the server's in-process history store
and then with Redis, and prints the median latency of each round. A model's pass costs this much more
over HTTP at least: the overhead goal of 1.15x (docs/benchmarks.md, "Overhead at 4 layers") leaves
0.15 x the pass for all of it. Nothing else should run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

import numpy as np

INSTANT_SERVER = "--instant-server"  # this script's own mode: the server, patched
SLEEP_VARIABLE = "BENCH_MODEL_SLEEP_MS"


def instant_server(argv: list[str]) -> int:
    """`cllm4rec serve` whose every job is answered with items 0..9 without a forward pass, after sleeping
    BENCH_MODEL_SLEEP_MS (a pass that takes time without computing)."""
    import os
    import time

    from service import cli, served_model

    sleep_s = float(os.environ.get(SLEEP_VARIABLE, "0")) / 1000

    def constant_ranking(self, jobs):
        if sleep_s:
            time.sleep(sleep_s)
        return [(list(range(min(job.k, len(self.titles)))), [0.5] * min(job.k, len(self.titles))) for job in jobs]

    served_model.ServedModel.score = constant_ranking
    return cli.main(argv)


def main() -> None:
    from serve_latency import MS, load
    from serve_process import serving, trained_users

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--requests", type=int, default=2000, help="per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=8780)
    parser.add_argument("--sleep-ms", type=float, default=0.0,
                        help="the instant model sleeps this long per batch first: the threads then wait as "
                             "around a real pass, without its computation")
    args = parser.parse_args()
    users = trained_users(args.checkpoint)
    rng = np.random.default_rng(0)
    print(f"{args.checkpoint}, instant model (sleeping {args.sleep_ms:g} ms a batch): median ms of "
          f"{args.requests} concurrency-1 requests per round")
    for store, redis_url in (("in-process", None), ("Redis", args.redis_url)):
        # CLLM4REC_DTYPE=float32: nothing to choose, the model never runs
        with serving(args.checkpoint.resolve(), args.port, {"CLLM4REC_DTYPE": "float32",
                                                            SLEEP_VARIABLE: str(args.sleep_ms)},
                     redis_url, entry=(__file__, INSTANT_SERVER)):
            url = f"http://127.0.0.1:{args.port}"
            asyncio.run(load(url, [{"user_id": user, "k": 10} for user in users[:32]], 1))  # warm-up
            medians = []
            for _ in range(args.rounds):
                bodies = [{"user_id": user, "k": 10} for user in rng.choice(users, args.requests)]
                latencies, _ = asyncio.run(load(url, bodies, 1))
                medians.append(MS * statistics.median(latencies))
        print(f"{store:>11} history store: " + ", ".join(f"{median:.3f}" for median in medians) + " ms")


if __name__ == "__main__":
    if sys.argv[1:2] == [INSTANT_SERVER]:
        sys.exit(instant_server(sys.argv[2:]))
    main()
