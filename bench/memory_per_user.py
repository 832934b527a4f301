"""Memory per user and per item: the trainer's and the server's, measured, for the capacity plan.

    python bench/memory_per_user.py --users 20000 80000 --items 2000 8000

Generates datasets that differ only in their user count (then only in their item count), trains
each for one epoch (`cllm4rec train`, one backbone layer, no content LM: the tables, the optimizers'
moments once every row has had a step, the data and its prompts) and loads the checkpoint as the
server does (load_recommender: the collaborative tables only), then reads every row once, as a
server that has served every user has. Each in its own process; the figure is the peak resident
memory (ru_maxrss). The slope between two sizes is the cost per user (per item), the fixed part
(backbone, Python, torch) cancels. Prints a table; docs/deployment.md uses it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from model.synthetic import write_synthetic_dataset

TRAIN = ["--backbone-layers", "1", "--content-epochs", "0", "--pretrain-epochs", "0", "--finetune-epochs", "1",
         "--val-users", "50", "--distill-weight", "0", "--no-content", "--autocast", "off"]
LOAD = ("import json, resource, sys, torch; from model.checkpoint import load_recommender; "
        "r = load_recommender(sys.argv[1], 'cpu', getattr(torch, sys.argv[2])); "
        "[float(p.float().sum()) for p in r.model.parameters()]; "
        "print(json.dumps({'rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))")


def peak_of(command: list[str]) -> int:
    """Peak resident bytes of a child process (its own ru_maxrss, read in a wrapper)."""
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return int(subprocess.run([sys.executable, "-c", wrapper, *command], env=env, check=True, capture_output=True,
                              text=True).stdout.split()[-1])


def measure(users: int, items: int, root: Path) -> dict:
    data = write_synthetic_dataset(root / f"data-{users}-{items}", n_users=users, n_items=items, n_categories=20,
                                   min_items=5, max_items=10, seed=0, reviews=False)
    out = root / f"ckpt-{users}-{items}"
    train = peak_of([sys.executable, "-m", "service.cli", "train", "--data", str(data), "--out", str(out), *TRAIN])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    serve = {dtype: json.loads(subprocess.run([sys.executable, "-c", LOAD, str(out), dtype], env=env, check=True,
                                              capture_output=True, text=True).stdout)["rss"]
             for dtype in ("float32", "bfloat16")}
    return {"users": users, "items": items, "train": train, "serve": serve["float32"], "serve_bf16": serve["bfloat16"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, nargs=2, default=[20000, 80000])
    parser.add_argument("--items", type=int, nargs=2, default=[2000, 8000])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = measure(args.users[0], args.items[0], root)
        more_users = measure(args.users[1], args.items[0], root)
        more_items = measure(args.users[0], args.items[1], root)
    print(f"peak resident memory (MB) at {args.users[0]} users x {args.items[0]} items: "
          + ", ".join(f"{k} {base[k] / 1e6:.0f}" for k in ("train", "serve", "serve_bf16")))
    print("| | trainer | server (float32) | server (bfloat16) |\n|---|---|---|---|")
    for label, other, n in (("per user", more_users, args.users[1] - args.users[0]),
                            ("per item", more_items, args.items[1] - args.items[0])):
        print(f"| {label} | " + " | ".join(f"{(other[k] - base[k]) / n / 1e3:.2f} KB"
                                          for k in ("train", "serve", "serve_bf16")) + " |")


if __name__ == "__main__":
    main()
