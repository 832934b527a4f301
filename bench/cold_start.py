"""Cold start: items that training never saw, added by their text the way POST /items adds them.

    python bench/cold_start.py --data ../shared/data/amazon-scientific --out /tmp/cold [--cold-items 0.1] \
        [--train "--recipe cpu --time-budget 10"]

1. A seeded random share (--cold-items) of the items is held out of training entirely: they and
   every interaction with them are left out of a copy of the dataset (OUT/warm).
2. `cllm4rec train` on that copy (OUT/checkpoint; reused when it is there).
3. The checkpoint is loaded as the server loads it and the held-out items are added by their text
   with ServedModel.add_live_items, the code behind POST /items.
4. For every user the checkpoint knows who interacted with a cold item: the prompt is the user's
   token and warm items (all of them, in order); the targets are the user's cold items.
   Recall@20 / Recall@40 / NDCG@100 of two rankings: among the cold items only (which new item fits
   this user: how well the text places them against each other), and among all items but the prompt's
   (how new items fare against the catalogue; cold_share@20: the share of cold items in the top 20).
   Beside CLLM4Rec: a text-only baseline (each item scored by the summed tf-idf cosine of its text,
   title and description, with the texts of the user's warm items, model/teachers.text_matrix) and
   random scores.
5. warm_cost: what the added items cost the catalogue's own recommendations: each known user's last warm
   item held out of a prompt of the others, ranked among all items with the cold items and without.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from model.cllm4rec import score_prompts
from model.data import load_dataset
from model.evaluate import ranking_metrics
from model.prompts import build_recommend_prompt
from model.teachers import text_matrix
from service.catalogue import LiveItem
from service.served_model import ServedModel
from service.settings import Settings

TOP = 100  # the longest cut-off of the metrics (NDCG@100)
BATCH = 64  # prompts per forward pass


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


def item_descriptions(data: Path) -> dict[str, tuple[str, str | None]]:
    """item id -> (title, description or None) as items.csv has them."""
    with open(data / "items.csv", newline="") as source:
        return {row["item_id"]: (row["title"], row.get("description") or None) for row in csv.DictReader(source)}


def top_items(scores: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """[U, min(TOP, columns)] the item indices of `scores`' columns, best first."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :TOP]
    return columns[order]


def warm_cost(recommender, by_user: dict[int, list[int]], dataset, cold: set[str], cold_columns: np.ndarray
              ) -> dict[str, dict[str, float]]:
    """What the new items cost the catalogue's own recommendations: for every known user with two or more
    warm items, the last one held out and the others prompting, its rank among all items but the prompt's,
    with the cold items in the catalogue and with them masked."""
    item_index = recommender.item_index
    cases = []
    for user, items in by_user.items():
        warm = [item_index[dataset.item_ids[i]] for i in items if dataset.item_ids[i] not in cold]
        if len(warm) >= 2 and dataset.user_ids[user] in recommender.user_index:
            cases.append((recommender.user_index[dataset.user_ids[user]], warm[:-1], np.array(warm[-1:])))
    tops: dict[str, list[np.ndarray]] = {"with_cold_items": [], "without": []}
    for start in range(0, len(cases), BATCH):
        batch = cases[start:start + BATCH]
        prompts = [build_recommend_prompt(recommender.space, user, warm, recommender.max_history)
                   for user, warm, _ in batch]
        scores = score_prompts(recommender.model, prompts).numpy()
        for row, (_, warm, _) in enumerate(batch):
            scores[row, warm] = -np.inf
        columns = np.arange(scores.shape[1])
        tops["with_cold_items"].append(top_items(scores, columns))
        scores[:, cold_columns] = -np.inf
        tops["without"].append(top_items(scores, columns))
    heldout = [target for _, _, target in cases]
    return {"users": len(cases), **{name: {k: round(v, 4) for k, v in ranking_metrics(np.concatenate(top),
                                                                                        heldout).items()}
                                    for name, top in tops.items()}}


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

    described = item_descriptions(args.data)  # what a shop would POST: title and description
    served = ServedModel.load(checkpoint, Settings(checkpoint=checkpoint, device="cpu"))
    texts = dict(zip(dataset.item_ids, dataset.item_texts))  # title and description, as the teacher reads them
    started = time.perf_counter()
    served.add_live_items([LiveItem(item_id, *described.get(item_id, ("", None))) for item_id in sorted(cold)])
    placement_seconds = time.perf_counter() - started
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

    # Text only: tf-idf rows of every item's text (warm and cold), in the served model's item order.
    all_texts = [texts[item_id] for item_id in recommender.checkpoint.item_ids]
    tfidf = text_matrix(all_texts)
    noise = np.random.default_rng([args.seed, 1])
    tops: dict[tuple[str, str], list[np.ndarray]] = {}
    for start in range(0, len(cases), BATCH):
        batch = cases[start:start + BATCH]
        prompts = [build_recommend_prompt(recommender.space, user, warm, recommender.max_history)
                   for user, warm, _ in batch]
        scores = {"cllm4rec": score_prompts(recommender.model, prompts).numpy(),
                  "text_nearest_neighbours": np.stack([np.asarray((tfidf[warm] @ tfidf.T).sum(axis=0)).ravel()
                                                       for _, warm, _ in batch]),
                  "random": noise.random((len(batch), len(all_texts)))}
        for name, batch_scores in scores.items():
            tops.setdefault((name, "cold"), []).append(top_items(batch_scores[:, cold_columns], cold_columns))
            for row, (_, warm, _) in enumerate(batch):
                batch_scores[row, warm] = -np.inf  # ranked among all items: the prompt's own left out
            tops.setdefault((name, "all"), []).append(top_items(batch_scores, np.arange(len(all_texts))))

    heldout = [targets for _, _, targets in cases]
    result = {"dataset": str(args.data), "cold_items": len(cold), "users": len(cases), "train": args.train,
              "placement_seconds": round(placement_seconds, 1),
              "text_term": {"scale": served.text_readout.scale, "shift": served.text_readout.shift}
              if served.text_readout else None,
              "warm_cost": warm_cost(recommender, by_user, dataset, cold, cold_columns)}
    is_cold = np.zeros(len(all_texts), dtype=bool)
    is_cold[cold_columns] = True
    for (name, among), top in tops.items():
        top = np.concatenate(top)
        metrics = {k: round(v, 4) for k, v in ranking_metrics(top, heldout).items()}
        if among == "all":
            metrics["cold_share@20"] = round(float(is_cold[top[:, :20]].mean()), 4)
        result.setdefault(f"among_{among}_items", {})[name] = metrics
    print(json.dumps(result))


if __name__ == "__main__":
    main()
