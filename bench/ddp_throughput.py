"""Training tokens/s of one process against torchrun's data-parallel ranks on this machine.

    python bench/ddp_throughput.py --data ../shared/data/amazon-scientific --global-batch 64

Runs one finetuning epoch of `cllm4rec train` (the cpu recipe's model and options, no teacher, so
that the epoch is all training) three ways at the same global batch: one process on one thread,
one process on --threads threads, and --ranks torchrun ranks (gloo on the CPU, NCCL on GPUs) of
one thread each, taking global-batch / ranks examples each. tokens/s is the trainer's own figure
for the pass (all ranks' tokens over the pass's wall time, metrics.jsonl). Prints a table with the
scaling efficiency: ranks' tokens/s over ranks x the one-thread process's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BIN = Path(sys.executable).parent
OPTIONS = ["--recipe", "cpu", "--finetune-epochs", "1", "--distill-weight", "0", "--time-budget", "0",
           "--val-users", "200"]


def tokens_per_s(data: str, out: Path, batch: int, ranks: int, threads: int, device: str) -> float:
    command = [str(BIN / "cllm4rec"), "train", "--data", data, "--out", str(out), *OPTIONS,
               "--batch-size", str(batch), "--device", device]
    if ranks > 1:
        command = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(ranks), *command]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE", "TQDM_DISABLE": "1"}
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    return record["passes"]["recommend"]["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, ranks, threads in (("1 process, 1 thread", 1, 1),
                                      (f"1 process, {args.threads} threads", 1, args.threads),
                                      (f"{args.ranks} ranks, 1 thread each", args.ranks, 1)):
            out = Path(tmp) / label.replace(" ", "_").replace(",", "")
            value = tokens_per_s(args.data, out, args.global_batch // ranks, ranks, threads, args.device)
            rows.append((label, ranks, value))
            print(f"{label}: {value:.0f} tokens/s", flush=True)
    single = rows[0][2]
    print(f"\n| run (global batch {args.global_batch}) | tokens/s | scaling efficiency |\n|---|---|---|")
    for label, ranks, value in rows:
        print(f"| {label} | {value:.0f} | {value / (ranks * single):.2f} |" if ranks > 1 else
              f"| {label} | {value:.0f} | |")


if __name__ == "__main__":
    main()
