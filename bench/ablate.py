"""Validation ablations: train one arm per set of options, print a table of each arm's best epoch.

    python bench/ablate.py --data ../shared/data/amazon-scientific --out /tmp/ablations --epochs 4 \
        --arm "text init=--init text" --arm "+ head adapter=--init text --head-bias --head-adapter"

Every arm runs `cllm4rec train` with the same base options (4 layers, no content LM, finetuning only,
lr 1e-3, batch 32, 1,000 validation users; --base replaces them) plus its own, `--lanes` arms at a
time with one torch thread each. The table gives, per arm, the best validation epoch among the
first --epochs (the checkpoint the trainer would keep) and the mean seconds per finetuning epoch.
An arm whose directory already has a metrics.jsonl is read, not retrained (--retrain to redo it).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BASE = ("--backbone-layers 4 --no-content --content-epochs 0 --pretrain-epochs 0 --finetune-lr 1e-3 "
        "--batch-size 32 --val-users 1000")


def run_arm(name: str, options: str, args) -> None:
    out = Path(args.out) / name.replace(" ", "_").replace("/", "_")
    if (out / "metrics.jsonl").exists() and not args.retrain:
        return
    subprocess.run(["rm", "-rf", str(out)], check=True)
    command = [sys.executable, "-m", "service.cli", "train", "--data", args.data, "--out", str(out),
               *shlex.split(args.base), "--finetune-epochs", str(args.epochs), *shlex.split(options)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "TQDM_DISABLE": "1"}
    with open(f"{out}.log", "w") as log:
        subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)


def summary(name: str, args) -> str:
    path = Path(args.out) / name.replace(" ", "_").replace("/", "_") / "metrics.jsonl"
    if not path.exists():
        return f"| {name} | (no epoch finished) | | | | |"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    validated = [r for r in records if r["val"] and r["epoch"] <= args.epochs]
    best = max(validated, key=lambda r: r["score"])
    epochs = [r for r in validated if "passes" in r]  # not the head's refit (--head-refit)
    seconds = sum(sum(p["seconds"] for p in r["passes"].values()) for r in epochs) / len(epochs)
    values = " | ".join(f"{best['val'][k]:.4f}" for k in ("recall@20", "recall@40", "ndcg@100"))
    epoch = f"{best['epoch']}" + (f" + {best.get('share', 1):g} refit" if best["stage"] == "refit" else "")
    return f"| {name} | {values} | {epoch} | {seconds:.0f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True, help="directory of the arms' checkpoints and logs")
    parser.add_argument("--arm", action="append", required=True, help='"NAME=OPTIONS" (repeatable)')
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--base", default=BASE, help="options every arm shares")
    parser.add_argument("--lanes", type=int, default=2, help="arms trained at once (one torch thread each)")
    parser.add_argument("--retrain", action="store_true")
    args = parser.parse_args()
    arms = [arm.split("=", 1) for arm in args.arm]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.lanes) as pool:
        list(pool.map(lambda arm: run_arm(arm[0], arm[1], args), arms))
    print("| arm | val Recall@20 | Recall@40 | NDCG@100 | best epoch | s / epoch |")
    print("|---|---|---|---|---|---|")
    for name, _ in arms:
        print(summary(name, args))


if __name__ == "__main__":
    main()
