"""Tokens per second of each training stage, and of scoring, with a real backbone on a real dataset.

    python bench/train_throughput.py --data ../shared/data/amazon-scientific --layers 30 8 4 2
    python bench/train_throughput.py --data ../shared/data/amazon-beauty --layers 30 --batch-size 32 128 512
    python bench/train_throughput.py --data ../shared/data/amazon-beauty --layers 4 --autocast off bf16 --threads 2

For each layer count, batch size and --autocast mode (model/precision.py): the collaborative, content
and recommendation passes (the trainer's own batches and step: forward, backward, Adam). Per layer
count: scoring as validation and serving do it (score_prompts, batches of 64). Each is timed over
--batches batches after one warm-up batch. Prints a table; docs/benchmarks.md records it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from model.backbone import DEFAULT_BACKBONE, load_backbone
from model.cllm4rec import CLLM4Rec, score_prompts
from model.data import load_dataset, split_dataset
from model.prompts import PromptTemplates, TokenSpace, build_recommend_prompt
from model.config import TrainConfig
from model.precision import AUTOCAST_MODES, cpu_has_bf16_units
from model.train import Trainer


def time_batches(step, batches) -> float:
    """Tokens per second of step() over batches (the first batch is a warm-up and not counted)."""
    step(batches[0])
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    tokens, start = 0, time.perf_counter()
    for batch in batches[1:]:
        step(batch)
        tokens += batch.n_tokens if hasattr(batch, "n_tokens") else sum(map(len, batch))
    sync()
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE)
    parser.add_argument("--layers", type=int, nargs="+", default=[30, 8, 4, 2])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[TrainConfig.batch_size])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--max-text-tokens", type=int, default=TrainConfig.max_text_tokens)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--autocast", nargs="+", default=["auto"], choices=AUTOCAST_MODES)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{args.threads} threads"
    print(f"{platform.processor() or platform.machine()}, {where}, torch {torch.__version__}, {device}, "
          f"CPU bf16 units: {cpu_has_bf16_units()}")

    dataset = load_dataset(args.data)
    split = split_dataset(dataset, seed=0)
    rng = np.random.default_rng(0)
    rows = []
    for n_layers in args.layers:
        backbone, tokenizer = load_backbone(args.backbone, n_layers, device)
        model = CLLM4Rec(backbone, dataset.n_users, dataset.n_items).to(device)
        space = TokenSpace(tokenizer, model.n_words, dataset.n_users, dataset.n_items, PromptTemplates())
        for batch_size, mode in itertools.product(args.batch_size, args.autocast):
            config = TrainConfig(data=args.data, out="", batch_size=batch_size, max_text_tokens=args.max_text_tokens,
                                 autocast=mode)
            # The trainer's own batches and step.
            trainer = Trainer(config, dataset, split, model, space, device, Path(tempfile.gettempdir()))
            model.train()
            result = {"layers": n_layers, "batch": batch_size, "autocast": mode}
            for name in ("collaborative", "content", "recommend"):
                if name == "content" and not trainer.content_documents:
                    continue
                batches = trainer.batches(name, rng)[: args.batches + 1]
                result[name] = time_batches(lambda batch, name=name: trainer.train_step(name, batch), batches)
            rows.append(result)
            print(result, flush=True)

        # Scoring as validation and serving do it (score_prompts), batches of 64 prompts.
        model.eval()
        prompts = [build_recommend_prompt(space, u, split.train[u].tolist(), TrainConfig.max_history)
                   for u in range(dataset.n_users)]
        prompts.sort(key=len)
        score_batches = [prompts[i : i + 64] for i in range(0, min(len(prompts), 64 * (args.batches + 1)), 64)]
        rows[-1]["scoring"] = time_batches(lambda batch: score_prompts(model, batch), score_batches)
        print({"layers": n_layers, "scoring": rows[-1]["scoring"]}, flush=True)

    stages = ["collaborative", "content", "recommend", "scoring"]
    print(f"\ntokens/s ({os.path.basename(args.data.rstrip('/'))}; scoring batch 64)")
    print(f"{'layers':>6}{'batch':>7}{'autocast':>9}" + "".join(f"{s:>15}" for s in stages))
    for r in rows:
        cells = "".join(f"{r[s]:>15.0f}" if s in r else f"{'-':>15}" for s in stages)
        print(f"{r['layers']:>6}{r['batch']:>7}{r['autocast']:>9}" + cells)

if __name__ == "__main__":
    main()
