"""Teachers for distillation: item-item models fitted on the training part only.

Finetuning can add a second target to the multinomial likelihood: the teacher's distribution over
the items that are not in the prompt, given the prompt's history (docs/training.md, distillation).
The teacher is a linear item-item model, so its scores for a prompt are a sum of rows:

    ease      B = I - P diag(1/diag(P)), P = (X'X + lambda I)^-1, diag(B) = 0   (Steck, 2019)
              a J x J matrix: used while the catalogue has at most `max_dense_items` items
    low-rank  B = V diag(s^2 / (s^2 + lambda)) V', V, s from a rank-r SVD of X  (ridge regression
              of X on itself through its top r directions): memory J x r for larger catalogues

X is the users x items matrix of TRAINING interactions: validation and test items never reach a
teacher, so neither the model's selection nor its test figures can leak through it.

The teacher's temperature is relative: scores are divided by `temperature * top1`, where top1 is the
mean best score over training users, measured when the teacher is fitted. EASE's scores have a
scale that depends on the data and lambda (0.04 for the best item on amazon-scientific); a relative
temperature means the same sharpness on every dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from model.data import Split
from model.evaluate import EASE_LAMBDAS, ease_weights, evaluate_scorer, interaction_matrix, selection_score

TOP1_USERS = 2000  # training users whose mean best score sets the temperature's unit


@dataclass
class Teacher:
    kind: str  # "ease" or "low-rank"
    lam: float
    weights: torch.Tensor | None  # ease: [J, J]
    factors: torch.Tensor | None  # low-rank: [J, r], columns scaled so that B = factors @ basis.T
    basis: torch.Tensor | None  # low-rank: [J, r]
    top1: float = 1.0  # mean best score of training users (unit of the temperature)

    @property
    def n_items(self) -> int:
        return (self.weights if self.weights is not None else self.factors).shape[0]

    def scores(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """[B, J] teacher scores: the sum of the rows of B of each history's items."""
        rows = torch.as_tensor([b for b, h in enumerate(histories) for _ in h], dtype=torch.long)
        cols = torch.as_tensor([i for h in histories for i in h], dtype=torch.long)
        x = torch.sparse_coo_tensor(torch.stack([rows, cols]), torch.ones(len(cols)),
                                    (len(histories), self.n_items), check_invariants=False)
        if self.weights is not None:
            return torch.sparse.mm(x, self.weights)
        return torch.sparse.mm(x, self.factors) @ self.basis.T

    def distribution(self, histories: Sequence[Sequence[int]], temperature: float) -> torch.Tensor:
        """[B, J] softmax of the teacher's scores / (temperature * top1); history items get 0."""
        scores = self.scores(histories) / (temperature * self.top1)
        for b, h in enumerate(histories):
            scores[b, list(h)] = -torch.inf
        empty = torch.as_tensor([not h for h in histories])
        scores[empty] = 0.0  # no history: the teacher knows nothing, a uniform target (weight 0 below anyway)
        return torch.softmax(scores, dim=-1)


def fit_ease(train: sp.csr_matrix, lam: float) -> Teacher:
    return Teacher("ease", lam, ease_weights(train, lam), None, None)


def fit_low_rank(train: sp.csr_matrix, lam: float, rank: int, seed: int = 0) -> Teacher:
    """Rank-r ridge regression of X on itself: B = V diag(s^2/(s^2+lam)) V'."""
    rank = min(rank, min(train.shape) - 1)
    torch.manual_seed(seed)
    coo = train.tocoo()
    x = torch.sparse_coo_tensor(np.vstack([coo.row, coo.col]), torch.as_tensor(coo.data), train.shape,
                                check_invariants=False)
    _, s, v = torch.svd_lowrank(x, q=rank, niter=4)
    shrink = s**2 / (s**2 + lam)
    return Teacher("low-rank", lam, None, (v * shrink).float().contiguous(), v.float().contiguous())


def fit_teacher(split: Split, n_items: int, lam: float | None, max_dense_items: int, rank: int,
                val_users: Sequence[int], seed: int = 0) -> Teacher:
    """The teacher of a run: EASE for catalogues up to max_dense_items, else low-rank. lam None:
    the best of EASE_LAMBDAS on val_users (validation items score the choice, as for evaluate's
    EASE; the fitted weights never see them)."""
    train = interaction_matrix(split, "val", n_items)  # the rows of the training part: known items at validation

    def fit(lam_: float) -> Teacher:
        return fit_ease(train, lam_) if n_items <= max_dense_items else fit_low_rank(train, lam_, rank, seed)

    if lam is None:
        known = interaction_matrix(split, "val", n_items)
        teacher, best = None, -1.0
        for candidate in map(fit, EASE_LAMBDAS):  # one at a time: an EASE matrix of 12k items is 0.6 GB
            score = selection_score(evaluate_scorer(
                lambda users: candidate.scores([known[u].indices.tolist() for u in users]), split, "val",
                val_users, 256))
            if score > best:
                teacher, best = candidate, score
    else:
        teacher = fit(lam)
    users = [u for u in range(train.shape[0]) if train.indptr[u + 1] > train.indptr[u]]
    sample = np.random.default_rng([seed, 3]).choice(users, min(TOP1_USERS, len(users)), replace=False)
    histories = [train[u].indices.tolist() for u in sample]
    scores = teacher.scores(histories)
    for b, h in enumerate(histories):
        scores[b, h] = -torch.inf
    teacher.top1 = float(scores.max(dim=1).values.clamp(min=1e-12).mean())
    return teacher
