"""Ranking metrics over all items, and the baselines a user compares the LLM with.

Protocol: for the validation part a user's known items are the training items; for the test part
they are the training and validation items. Known items are the model's input (the prompt, or the
rows of the user-item matrix) and are excluded from the ranking. Every model is fitted on the
training part only, so all see the same information.

    Recall@k = hits in the top k / min(k, number of held-out items)
    NDCG@k   = DCG of the top k (binary relevance) / DCG of an ideal ranking of min(k, held-out) hits
Both are averaged over the users with held-out items.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from model.cllm4rec import score_prompts
from model.data import Split
from model.prompts import TokenSpace, build_recommend_prompt

METRICS = (("recall", 20), ("recall", 40), ("ndcg", 100))
EASE_LAMBDAS = (50.0, 200.0, 500.0, 1000.0, 3000.0)
# Validation users that pick EASE's lambda: scoring all of them for every lambda took most of an
# evaluation's time on 20k+ users; a fixed sample of this size ranks the lambdas alike.
EASE_LAMBDA_USERS = 2000


def metric_names() -> list[str]:
    return [f"{name}@{k}" for name, k in METRICS]


def selection_score(metrics: dict[str, float]) -> float:
    """Recall@20 + Recall@40 + NDCG@100: how the trainer picks its best epoch."""
    return sum(metrics[name] for name in metric_names())


def known_items(split: Split, part: str, user: int) -> np.ndarray:
    if part == "val":
        return split.train[user]
    return np.concatenate([split.train[user], split.val[user]])


def evaluation_users(split: Split, part: str) -> list[int]:
    return [u for u, held in enumerate(split.part(part)) if len(held)]


def sample_users(users: Sequence[int], n: int, seed: int) -> list[int]:
    """A fixed random sample of n users, in order (all of them when n is 0 or not smaller)."""
    if not n or len(users) <= n:
        return list(users)
    return sorted(np.random.default_rng([seed, 1]).choice(users, n, replace=False).tolist())


def ranking_metrics(top: np.ndarray, heldout: Sequence[np.ndarray]) -> dict[str, float]:
    """top: [U, K] item indices best first (known items already excluded); heldout: per user."""
    max_k = max(k for _, k in METRICS)
    discounts = 1.0 / np.log2(np.arange(2, max_k + 2))
    sums = dict.fromkeys(metric_names(), 0.0)
    for ranked, held in zip(top, heldout):
        hits = np.isin(ranked, held)
        n_held = len(held)
        for name, k in METRICS:
            top_hits = hits[:k]  # fewer than k when the catalogue is smaller than k
            if name == "recall":
                sums[f"recall@{k}"] += top_hits.sum() / min(k, n_held)
            else:
                ideal = discounts[: min(k, n_held)].sum()
                sums[f"ndcg@{k}"] += (top_hits * discounts[: len(top_hits)]).sum() / ideal
    return {name: float(total / len(top)) for name, total in sums.items()}


def evaluate_scorer(score_users: Callable[[list[int]], torch.Tensor], split: Split, part: str,
                    users: Sequence[int], batch_size: int) -> dict[str, float]:
    """Metrics of a scorer that maps a batch of user indices to [B, J] item scores."""
    max_k = max(k for _, k in METRICS)
    tops = []
    for start in range(0, len(users), batch_size):
        batch = list(users[start : start + batch_size])
        scores = score_users(batch).float().cpu()
        known = torch.zeros(scores.shape, dtype=torch.bool)
        for row, u in enumerate(batch):
            known[row, torch.as_tensor(known_items(split, part, u), dtype=torch.long)] = True
        scores = scores.masked_fill(known, -torch.inf)  # a new tensor: scorers may return shared views
        tops.append(torch.topk(scores, min(max_k, scores.shape[1])).indices.numpy())
    return ranking_metrics(np.concatenate(tops), [split.part(part)[u] for u in users])


# --- CLLM4Rec --------------------------------------------------------------------------------

def cllm4rec_scorer(model, space: TokenSpace, split: Split, part: str, max_history: int):
    def score(users: list[int]) -> torch.Tensor:
        prompts = [build_recommend_prompt(space, u, known_items(split, part, u).tolist(), max_history) for u in users]
        return score_prompts(model, prompts)
    return score


def evaluate_cllm4rec(model, space: TokenSpace, split: Split, part: str, users: Sequence[int], max_history: int,
                      batch_size: int) -> dict[str, float]:
    # Users sorted by history length: batches pad less (same metrics, faster).
    users = sorted(users, key=lambda u: len(known_items(split, part, u)))
    return evaluate_scorer(cllm4rec_scorer(model, space, split, part, max_history), split, part, users, batch_size)


# --- baselines -------------------------------------------------------------------------------

def interaction_matrix(split: Split, part: str, n_items: int) -> sp.csr_matrix:
    """Users x items, 1 where the item is known when evaluating `part`."""
    rows = [known_items(split, part, u) for u in range(len(split.train))]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    indices = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    return sp.csr_matrix((np.ones(len(indices), dtype=np.float32), indices, indptr), shape=(len(rows), n_items))


def most_popular_scorer(split: Split, n_items: int):
    popularity = torch.as_tensor(np.bincount(np.concatenate(split.train), minlength=n_items), dtype=torch.float32)
    return lambda users: popularity.expand(len(users), -1)


def ease_weights(train: sp.csr_matrix, lam: float, side: tuple[float, sp.csr_matrix] | None = None,
                 dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """EASE (Steck, 2019), closed form: B = I - P diag(1/diag(P)), P = (X'X + lam I)^-1, diag(B) = 0.
    side = (alpha, T): X'X + alpha T T' instead, items' side information T (model/teachers.py)."""
    # On the GPU when there is one: the inverse is O(items^3), minutes on a CPU for 10k+ items.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gram = train.T @ train
    if side is not None:
        alpha, features = side
        gram = gram + alpha * (features @ features.T)
    gram = torch.as_tensor(gram.toarray(), dtype=dtype, device=device)
    gram.diagonal().add_(lam)
    precision = torch.cholesky_inverse(torch.linalg.cholesky(gram))
    weights = -precision / precision.diagonal()
    weights.diagonal().zero_()
    # LAPACK's inverse is column-major; row-major rows make `known @ weights` read each known item's
    # row in place (scipy copied the whole matrix per batch otherwise: minutes per pass at 12k items).
    return weights.float().cpu().contiguous()


def ease_scorer(split: Split, part: str, n_items: int, lam: float):
    weights = ease_weights(interaction_matrix(split, "val", n_items), lam).numpy()  # fitted on the training part
    known = interaction_matrix(split, part, n_items)
    return lambda users: torch.as_tensor(known[users] @ weights)


def pick_ease_lambda(split: Split, n_items: int, users: Sequence[int], batch_size: int,
                     lambdas: Sequence[float] = EASE_LAMBDAS) -> float:
    """The regularisation weight with the best selection score on the validation part."""
    best, best_score = lambdas[0], -1.0
    for lam in lambdas:
        score = selection_score(evaluate_scorer(ease_scorer(split, "val", n_items, lam), split, "val", users,
                                                batch_size))
        if score > best_score:
            best, best_score = lam, score
    return best
