"""Tokens per second of each training stage, and of scoring, with a real backbone on a real dataset.

    python bench/train_throughput.py --data ../shared/data/amazon-scientific --layers 30 8 4 2

For each layer count: the collaborative, content and recommendation passes (forward + backward +
Adam step, batches grouped by length as in training) and validation scoring (forward only), each
timed over --batches batches after one warm-up batch. Prints a table; docs/benchmarks.md records it.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from model.backbone import DEFAULT_BACKBONE, load_backbone
from model.cllm4rec import COLLAB, CONTENT, CLLM4Rec, collate_documents, collate_recommend, pad
from model.data import load_dataset, split_dataset
from model.prompts import PromptTemplates, TokenSpace, build_content_documents, build_recommend_prompt
from model.train import (TrainConfig, collaborative_documents, length_grouped_batches, make_optimizers,
                         recommend_examples)


def time_batches(step, batches) -> float:
    """Tokens per second of step() over batches (the first batch is a warm-up and not counted)."""
    step(batches[0])
    tokens, start = 0, time.perf_counter()
    for batch in batches[1:]:
        step(batch)
        tokens += batch.n_tokens if hasattr(batch, "n_tokens") else int(batch[1].sum())
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE)
    parser.add_argument("--layers", type=int, nargs="+", default=[30, 8, 4, 2])
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--max-text-tokens", type=int, default=TrainConfig.max_text_tokens)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, {device}")

    dataset = load_dataset(args.data)
    split = split_dataset(dataset, seed=0)
    rng = np.random.default_rng(0)
    config = TrainConfig(data=args.data, out="", finetune_targets="all")
    rows = []
    for n_layers in args.layers:
        backbone, tokenizer = load_backbone(args.backbone, n_layers, device)
        model = CLLM4Rec(backbone, dataset.n_users, dataset.n_items).to(device)
        space = TokenSpace(tokenizer, model.n_words, dataset.n_users, dataset.n_items, PromptTemplates())
        optimizers = {view: make_optimizers(model.tables(view), lr=1e-3) for view in (COLLAB, CONTENT)}

        def train_step(view, loss_fn):
            def step(batch):
                moved = type(batch)(*[t.to(device) for t in vars(batch).values()])
                loss = loss_fn(moved) + model.mutual_regularization(view, moved.users, moved.items)
                for optimizer in optimizers[view]:
                    optimizer.zero_grad()
                (loss / len(moved.input_ids)).backward()
                for optimizer in optimizers[view]:
                    optimizer.step()
            return step

        def lm_batches(documents, offset):
            lengths = [len(d.prompt) + len(d.main) for d in documents]
            index = length_grouped_batches(lengths, args.batch_size, rng)[: args.batches + 1]
            return [collate_documents([documents[i] for i in b], offset) for b in index]

        result = {"layers": n_layers}
        collab = collaborative_documents(space, split, config.max_history, rng)
        result["collaborative"] = time_batches(train_step(COLLAB, model.collaborative_nll),
                                               lm_batches(collab, space.n_words + space.n_users))
        content = build_content_documents(space, split.train_reviews(dataset), dataset.item_texts,
                                          args.max_text_tokens)
        if content:
            result["content"] = time_batches(train_step(CONTENT, model.content_nll), lm_batches(content, 0))
        examples = recommend_examples(space, split, config, rng)
        index = length_grouped_batches([len(e[0]) for e in examples], args.batch_size, rng)[: args.batches + 1]
        batches = [collate_recommend(*zip(*[examples[i] for i in b]), n_items=space.n_items) for b in index]
        result["recommend"] = time_batches(train_step(COLLAB, model.recommend_nll), batches)

        prompts = [build_recommend_prompt(space, u, split.train[u].tolist(), config.max_history)
                   for u in range(dataset.n_users)]
        prompts.sort(key=len)
        score_batches = [pad(prompts[i : i + 64]) for i in range(0, 64 * (args.batches + 1), 64)]

        def score(batch):
            with torch.no_grad():
                model.prompt_item_logits(batch[0].to(device), batch[1].to(device))
        result["scoring"] = time_batches(score, score_batches)
        rows.append(result)
        print(result, flush=True)

    stages = ["collaborative", "content", "recommend", "scoring"]
    print(f"\ntokens/s ({os.path.basename(args.data.rstrip('/'))}, batch {args.batch_size}; scoring batch 64)")
    print(f"{'layers':>6}" + "".join(f"{s:>15}" for s in stages))
    for r in rows:
        print(f"{r['layers']:>6}" + "".join(f"{r[s]:>15.0f}" if s in r else f"{'-':>15}" for s in stages))


if __name__ == "__main__":
    main()
