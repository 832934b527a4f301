"""Each backbone format the server can choose at load, timed at every batch size it serves, and its choice.

    python bench/backbone_formats.py --checkpoint runs/quickstart/checkpoint [--max-batch-size 32] [--threads 2]

For the checkpoint's sample prompts (service.precision.sample_prompts, prompts as served), prints the median
time of a scoring pass (score_prompts: the backbone in that format, the float32 head) of 1, 2, 4, ... up to
--max-batch-size prompts for PyTorch's float32 and each candidate format of this machine (on a CPU ONNX
Runtime's float32 and, with bfloat16 units, the bfloat16 formats; on CUDA the graphs), twice over (this VM
drifts), then what choose_backbone_format keeps, which is what `cllm4rec serve` does with CLLM4REC_DTYPE=auto.
docs/benchmarks.md ("Small and large batches in different formats") records the figures.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the server does (service/__init__.py), before torch

import argparse  # noqa: E402  (the imports below come after the environment is set)
from pathlib import Path

import torch

from model.checkpoint import load_recommender
from model.cuda_graphs import batch_buckets
from service.precision import (SAMPLE_PROMPTS, BackboneFormat, candidate_formats, choose_backbone_format, median_ms,
                               sample_prompts)

ROUNDS = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--max-batch-size", type=int, default=32, help="as CLLM4REC_MAX_BATCH_SIZE")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (a CPU's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per size (the median counts)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recommender = load_recommender(args.checkpoint, None)
    prompts = sample_prompts(recommender, max(SAMPLE_PROMPTS, args.max_batch_size))
    sizes = [size for size in batch_buckets(args.max_batch_size) if size <= len(prompts)]
    formats = {"float32": None, **{name: BackboneFormat(recommender, name, args.max_batch_size)
                                   for name in candidate_formats(recommender.model)}}
    print(f"{args.checkpoint} on {recommender.device}, {torch.get_num_threads()} threads: ms per scoring pass")
    print(f"{'round':>5} {'format':>20} " + " ".join(f"{f'batch {size}':>9}" for size in sizes))
    for round_ in range(ROUNDS):
        for name, backbone_format in formats.items():
            if backbone_format is not None:
                backbone_format.put_on()
            times = [median_ms(recommender, prompts[:size], 1, args.repeats) for size in sizes]
            if backbone_format is not None:
                backbone_format.take_off()
            print(f"{round_ + 1:>5} {name:>20} " + " ".join(f"{ms:>9.1f}" for ms in times), flush=True)
    print("the server's choice:", choose_backbone_format(recommender, args.max_batch_size).reason)


if __name__ == "__main__":
    main()
