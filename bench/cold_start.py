"""Cold start: items that training never saw, added by their text the way POST /items adds them.

    python bench/cold_start.py --data ../shared/data/amazon-scientific --out /tmp/cold [--cold-items 0.1] \
        [--train "--recipe cpu --time-budget 10"]

1. A seeded random share (--cold-items) of the items is held out of training entirely: they and
   every interaction with them are left out of a copy of the dataset (OUT/warm).
2. `cllm4rec train` on that copy (OUT/checkpoint; reused when it is there).
3. The checkpoint is loaded as the server loads it and the held-out items are added by their text
   with ServedModel.add_live_items, the code behind POST /items.
4. For every user the checkpoint knows who interacted with a cold item: the prompt is the user's
   token and warm items (all of them, in order); the targets are the user's cold items; the ranking
   is over the cold items only (which new item fits this user), Recall@20 / Recall@40 / NDCG@100.
   Beside CLLM4Rec: a text-only baseline (each cold item scored by the summed tf-idf cosine of its
   text with the texts of the user's warm items, model/teachers.text_matrix) and random scores.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

from model.cllm4rec import score_prompts
from model.data import load_dataset
from model.evaluate import ranking_metrics
from model.prompts import build_recommend_prompt
from model.teachers import text_matrix
from service.catalogue import LiveItem
from service.engine import ServedModel
from service.settings import Settings

TOP = 100  # the longest cut-off of the metrics (NDCG@100)


def write_warm_copy(data: Path, target: Path, cold: set[str]) -> None:
    """The dataset's CSV files without the cold items' rows."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("interactions.csv", "items.csv", "reviews.csv"):
        if not (data / name).exists():
            continue
        with open(data / name, newline="") as source, open(target / name, "w", newline="") as copy:
            rows = csv.reader(source)
            header = next(rows)
            column = header.index("item_id")
            writer = csv.writer(copy)
            writer.writerow(header)
            writer.writerows(row for row in rows if row[column] not in cold)


def top_cold(scores: np.ndarray, cold_columns: np.ndarray) -> np.ndarray:
    """[U, min(TOP, cold)] cold item indices (columns of `scores`), best first."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :TOP]
    return cold_columns[order]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cold-items", type=float, default=0.1, help="share of the items held out of training")
    parser.add_argument("--train", default="--recipe cpu --time-budget 10", help="options of cllm4rec train")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    dataset = load_dataset(args.data)
    rng = np.random.default_rng(args.seed)
    cold_indices = np.sort(rng.choice(dataset.n_items, round(args.cold_items * dataset.n_items), replace=False))
    cold = {dataset.item_ids[i] for i in cold_indices}
    checkpoint = args.out / "checkpoint"
    if not (checkpoint / "checkpoint.json").exists():
        write_warm_copy(args.data, args.out / "warm", cold)
        subprocess.run([sys.executable, "-m", "service.cli", "train", "--data", str(args.out / "warm"),
                        "--out", str(checkpoint), *shlex.split(args.train)], check=True)

    served = ServedModel.load(checkpoint, Settings(checkpoint=checkpoint, device="cpu"))
    texts = dict(zip(dataset.item_ids, zip(dataset.item_titles, dataset.item_texts)))
    served.add_live_items([LiveItem(item_id, texts[item_id][0], texts[item_id][1]) for item_id in sorted(cold)])
    recommender = served.recommender
    item_index = recommender.item_index
    cold_columns = np.array(sorted(item_index[i] for i in cold))

    # Users the checkpoint knows, with a cold item: warm items (in order) prompt, cold items are targets.
    by_user: dict[int, list[int]] = {}
    for user, item in dataset.interactions.tolist():
        by_user.setdefault(user, []).append(item)
    cases = []
    for user, items in by_user.items():
        user_id = dataset.user_ids[user]
        warm = [item_index[dataset.item_ids[i]] for i in items if dataset.item_ids[i] not in cold]
        targets = [item_index[dataset.item_ids[i]] for i in items if dataset.item_ids[i] in cold]
        if targets and warm and user_id in recommender.user_index:
            cases.append((recommender.user_index[user_id], warm, np.array(targets)))

    model_scores = []
    for start in range(0, len(cases), 64):
        prompts = [build_recommend_prompt(recommender.space, user, warm, recommender.max_history)
                   for user, warm, _ in cases[start:start + 64]]
        model_scores.append(score_prompts(recommender.model, prompts)[:, cold_columns].numpy())
    model_scores = np.concatenate(model_scores)

    # Text only: tf-idf rows of every item's text (warm and cold), in the served model's item order.
    all_texts = [texts[item_id][1] or texts[item_id][0] for item_id in recommender.checkpoint.item_ids]
    tfidf = text_matrix(all_texts)
    cold_text = tfidf[cold_columns]
    text_scores = np.stack([np.asarray((tfidf[warm] @ cold_text.T).sum(axis=0)).ravel() for _, warm, _ in cases])
    random_scores = np.random.default_rng([args.seed, 1]).random(model_scores.shape)

    heldout = [targets for _, _, targets in cases]
    result = {"dataset": str(args.data), "cold_items": len(cold), "users": len(cases),
              "train": args.train, "ranked_among": "cold items"}
    for name, scores in (("cllm4rec", model_scores), ("text_nearest_neighbours", text_scores),
                         ("random", random_scores)):
        result[name] = {k: round(v, 4) for k, v in ranking_metrics(top_cold(scores, cold_columns), heldout).items()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
