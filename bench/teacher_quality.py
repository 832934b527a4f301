"""Validation metrics of the distillation teacher for each text weight (0: plain EASE).

    python bench/teacher_quality.py --data ../shared/data/amazon-scientific [--weights 0 0.1 0.3 1 3]

The split is the trainer's (seed 0); the teacher is fitted on the training part and scores the
validation part of a fixed sample of validation users, exactly as the trainer's text-weight choice
does (model/teachers.py). Prints one line per weight and the fitting time.
"""

from __future__ import annotations

import argparse
import time

from model.config import TrainConfig
from model.data import load_dataset, split_dataset
from model.evaluate import evaluate_scorer, evaluation_users, interaction_matrix, sample_users
from model.teachers import TEXT_WEIGHT_LAMBDA, fit_teacher, teacher_texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.1, 0.3, 1.0, 3.0])
    parser.add_argument("--lam", type=float, default=TEXT_WEIGHT_LAMBDA, help="the teacher's lambda (where the "
                        "trainer chooses the text weight, before it picks the lambda at that weight)")
    parser.add_argument("--users", type=int, default=2000, help="validation users scored")
    parser.add_argument("--max-dense-items", type=int, default=TrainConfig.teacher_max_items,
                        help="0: the low-rank teacher at any catalogue size")
    parser.add_argument("--rank", type=int, default=TrainConfig.teacher_rank, help="rank of the low-rank teacher")
    args = parser.parse_args()
    dataset = load_dataset(args.data)
    split = split_dataset(dataset, seed=0)
    users = sample_users(evaluation_users(split, "val"), args.users, seed=0)
    texts = teacher_texts(dataset, split)
    known = interaction_matrix(split, "val", dataset.n_items)
    print(f"{dataset.n_users} users, {dataset.n_items} items; validation, {len(users)} users, lambda {args.lam:g}")
    for weight in args.weights:
        started = time.perf_counter()
        teacher = fit_teacher(split, dataset.n_items, args.lam, args.max_dense_items, args.rank, users,
                              texts, weight)
        seconds = time.perf_counter() - started
        metrics = evaluate_scorer(lambda batch: teacher.scores([known[u].indices.tolist() for u in batch]), split,
                                  "val", users, 256)
        print(f"{teacher.kind} text weight {weight:g}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
              + f" (fitted in {seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
