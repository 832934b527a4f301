"""What serving in half precision costs in ranking quality, and what it saves in time.

    python bench/serving_precision.py --checkpoint checkpoints/beauty [--users 2000] [--device cuda]

Loads the checkpoint in float32, float16 and bfloat16 on one device and, for the same test users
(prompts from training + validation items, as served), prints each precision's test Recall@20/40 and
NDCG@100, how many of float32's top 20 items it returns too, and the forward time per batch of 64.
CLLM4REC_DTYPE picks the precision the server uses; docs/benchmarks.md records the figures.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from model.checkpoint import load_recommender
from model.cllm4rec import score_prompts
from model.evaluate import evaluate_cllm4rec, evaluation_users, known_items
from model.prompts import build_recommend_prompt

BATCH = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--users", type=int, default=2000, help="test users sampled (0: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    reference_top = None
    print(f"{'dtype':>9} {'recall@20':>10} {'recall@40':>10} {'ndcg@100':>9} {'top-20 as fp32':>15} {'ms/batch':>9}")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        recommender = load_recommender(args.checkpoint, args.device, dtype)
        split = recommender.checkpoint.split
        users = evaluation_users(split, "test")
        if args.users and len(users) > args.users:
            users = sorted(np.random.default_rng(0).choice(users, args.users, replace=False).tolist())
        metrics = evaluate_cllm4rec(recommender.model, recommender.space, split, "test", users,
                                    recommender.max_history, BATCH)
        prompts = [build_recommend_prompt(recommender.space, u, known_items(split, "test", u).tolist(),
                                          recommender.max_history) for u in users]
        started, tops = time.perf_counter(), []
        for start in range(0, len(prompts), BATCH):
            tops.append(score_prompts(recommender.model, prompts[start : start + BATCH]).topk(20).indices.cpu())
        milliseconds = (time.perf_counter() - started) * 1000 / len(tops)
        top = torch.cat(tops)
        if reference_top is None:
            reference_top = top
        agreement = np.mean([len(set(a.tolist()) & set(b.tolist())) / 20 for a, b in zip(top, reference_top)])
        print(f"{str(dtype).removeprefix('torch.'):>9} {metrics['recall@20']:>10.4f} {metrics['recall@40']:>10.4f} "
              f"{metrics['ndcg@100']:>9.4f} {agreement:>15.3f} {milliseconds:>9.1f}", flush=True)
        del recommender


if __name__ == "__main__":
    main()
