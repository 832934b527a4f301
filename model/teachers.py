"""Teachers for distillation: item-item models fitted on the training part only.

Finetuning can add a second target to the multinomial likelihood: the teacher's distribution over
the items that are not in the prompt, given the prompt's history (docs/training.md, distillation).
The teacher is a linear item-item model, so its scores for a prompt are a sum of rows:

    ease      B = I - P diag(1/diag(P)), P = (G + lambda I)^-1, diag(B) = 0   (Steck, 2019)
              a J x J matrix: used while the catalogue has at most `max_dense_items` items
    low-rank  B = V diag(s^2 / (s^2 + lambda)) V', V, s from a rank-r SVD of [X; sqrt(alpha) T']
              (ridge regression through its top r directions): memory J x r for larger catalogues

with the item-item Gram matrix of interactions and item text (Jeunen, Van Balen and Goethals,
"Closed-form models for collaborative filtering with side-information", RecSys 2020):

    G = X'X + alpha T T'

X is the users x items matrix of TRAINING interactions; T holds each item's text (title, description
and the reviews of its training pairs: teacher_texts) as a unit-length tf-idf row over its words, so
T T' is the items' text similarity and alpha weighs it against co-occurrence (text_weight x the mean
item count of X, so that one value means the same on every dataset). With alpha 0 this is plain EASE.
Item text is what a content LM reads; in the teacher it is what lets a closed-form model beat EASE on
sparse data (docs/training.md).
Validation and test interactions never reach a teacher, so neither the model's selection nor its
test figures can leak through it.

The teacher's temperature is relative: scores are divided by `temperature * top1`, where top1 is the
mean best score over training users, measured when the teacher is fitted. EASE's scores have a
scale that depends on the data and lambda (0.04 for the best item on amazon-scientific); a relative
temperature means the same sharpness on every dataset.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import re

import numpy as np
import scipy.sparse as sp
import torch

from model.data import Dataset, Split
from model.evaluate import EASE_LAMBDAS, ease_weights, evaluate_scorer, interaction_matrix, selection_score
from model.initialise import truncated_svd

TOP1_USERS = 2000  # training users whose mean best score sets the temperature's unit
# The text weights tried on validation (besides 0, plain EASE). Each is one items x items inverse
# (about a minute at 12k items on one core), so the grid is short: the best weights measured were 1
# on amazon-scientific and 0.3 on amazon-beauty (docs/training.md).
TEXT_WEIGHTS = (0.1, 0.3, 1.0)
# Where the text weight is chosen when the lambda is chosen too (the lambda after it, at that weight): one
# search at a time, 8 fits instead of a grid's 20. Weight first measured better than lambda first on two of the three
# datasets (docs/training.md, "The teacher's lambda, and reviews as item text").
TEXT_WEIGHT_LAMBDA = 500.0
MAX_WORD_SHARE = 0.1  # words in more than this share of item texts carry no similarity


@dataclass
class Teacher:
    kind: str  # "ease" or "low-rank"
    lam: float
    text_weight: float
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


def teacher_texts(dataset: Dataset, split: Split) -> list[str]:
    """Each item's text for the teacher: its title and description, then the reviews of its training pairs.
    Never a validation or test pair's review: a user's own wording would tie their held-out items to their
    training items."""
    reviews: list[list[str]] = [[] for _ in range(dataset.n_items)]
    for (_, item), review in split.train_reviews(dataset).items():
        reviews[item].append(review)
    return [" ".join(filter(None, (text, *item_reviews))) for text, item_reviews in zip(dataset.item_texts, reviews)]


def text_matrix(texts: Sequence[str]) -> sp.csr_matrix:
    """[J, words] unit-length tf-idf rows of the item texts; words of one item or of more than
    MAX_WORD_SHARE of the items are left out (no similarity, or no distinction)."""
    return tfidf_rows(word_sets(texts, {}))


def word_sets(texts: Sequence[str], vocabulary: dict[str, int]) -> sp.csr_matrix:
    """[texts, len(vocabulary)] 1 where the text holds the word; words not in `vocabulary` are added to it
    (the tokenizing is most of text_matrix's time: model.placement.CatalogueTexts keeps a catalogue's)."""
    rows, cols = [], []
    for item, text in enumerate(texts):
        for word in set(re.findall(r"\w+", (text or "").lower())):
            rows.append(item)
            cols.append(vocabulary.setdefault(word, len(vocabulary)))
    return sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(texts), len(vocabulary)))


def tfidf_rows(counts: sp.csr_matrix) -> sp.csr_matrix:
    """text_matrix of texts given by their word_sets."""
    n_texts = counts.shape[0]
    frequency = np.asarray(counts.sum(axis=0)).ravel()
    keep = (frequency >= 2) & (frequency <= MAX_WORD_SHARE * n_texts)
    weighted = counts[:, keep] @ sp.diags(np.log(n_texts / frequency[keep]))
    norms = np.sqrt(np.asarray(weighted.multiply(weighted).sum(axis=1)).ravel())
    return (sp.diags(1 / np.maximum(norms, 1e-12)) @ weighted).tocsr()


def text_alpha(train: sp.csr_matrix, text_weight: float) -> float:
    """alpha of G = X'X + alpha T T': text_weight times the mean number of training users of an item."""
    return text_weight * train.nnz / max(train.shape[1], 1)


def fit_ease(train: sp.csr_matrix, lam: float, text: sp.csr_matrix | None = None, text_weight: float = 0.0) -> Teacher:
    side = (text_alpha(train, text_weight), text) if text is not None and text_weight else None
    # float32: with lambda >= 50 (EASE_LAMBDAS) the system is well conditioned, and a teacher's scores only
    # shape a softmax; it halves the time of the inverse (evaluate's EASE baseline stays float64).
    return Teacher("ease", lam, text_weight, ease_weights(train, lam, side, torch.float32), None, None)


def fit_low_rank(train: sp.csr_matrix, lam: float, rank: int, text: sp.csr_matrix | None = None,
                 text_weight: float = 0.0, seed: int = 0) -> Teacher:
    """Rank-r ridge regression through the top directions of [X; sqrt(alpha) T']: B = V diag(s^2/(s^2+lam)) V'."""
    if text is not None and text_weight:
        train = sp.vstack([train, np.sqrt(text_alpha(train, text_weight)) * text.T.tocsr()]).tocsr()
    _, s, v = truncated_svd(train, rank, seed, niter=4)
    shrink = s**2 / (s**2 + lam)
    return Teacher("low-rank", lam, text_weight, None, (v * shrink).float().contiguous(), v.float().contiguous())


def fit_teacher(split: Split, n_items: int, lam: float | None, max_dense_items: int, rank: int,
                val_users: Sequence[int], texts: Sequence[str] = (), text_weight: float | None = None,
                seed: int = 0) -> Teacher:
    """The teacher of a run: EASE for catalogues up to max_dense_items, else low-rank; with item text
    when `texts` has any. Validation items score the choices on val_users, as for evaluate's EASE lambda
    (the fitted weights never see them): text_weight None, the best of none and TEXT_WEIGHTS at lam (at
    TEXT_WEIGHT_LAMBDA when lam is None); lam None, then the best of evaluate's EASE_LAMBDAS at that
    weight (without text: plain EASE's lambda, as evaluate picks it)."""
    train = interaction_matrix(split, "val", n_items)  # the rows of the training part: known items at validation
    text = text_matrix(texts) if any(texts) else None
    if text is not None and text.nnz == 0:
        text = None

    def fit(lam: float, weight: float) -> Teacher:
        if n_items <= max_dense_items:
            return fit_ease(train, lam, text, weight)
        return fit_low_rank(train, lam, rank, text, weight, seed)

    def validation_score(teacher: Teacher) -> float:
        return selection_score(evaluate_scorer(
            lambda users: teacher.scores([train[u].indices.tolist() for u in users]), split, "val", val_users, 256))

    def best_of(choices: Iterable[tuple[float, float]], teacher: Teacher | None = None,
                best: float = -1.0) -> tuple[Teacher, float]:
        """The best on validation of `teacher` (scored `best`) and one fitted for each (lambda, weight) in
        turn: one at a time, as an EASE matrix of 12k items is 0.6 GB."""
        for choice in choices:
            candidate = fit(*choice)
            score = validation_score(candidate)
            if score > best:
                teacher, best = candidate, score
            del candidate
        return teacher, best

    weights = (0.0, *TEXT_WEIGHTS) if text is not None and text_weight is None else \
        (text_weight if text is not None else 0.0,)
    if lam is not None and len(weights) == 1:
        teacher = fit(lam, weights[0])  # nothing to choose
    else:
        teacher, best = best_of((lam or TEXT_WEIGHT_LAMBDA, weight) for weight in weights)
        if lam is None:  # then the lambda, at the weight chosen
            teacher, _ = best_of(((choice, teacher.text_weight) for choice in EASE_LAMBDAS if choice != teacher.lam),
                                 teacher, best)
    users = [u for u in range(train.shape[0]) if train.indptr[u + 1] > train.indptr[u]]
    sample = np.random.default_rng([seed, 3]).choice(users, min(TOP1_USERS, len(users)), replace=False)
    histories = [train[u].indices.tolist() for u in sample]
    scores = teacher.scores(histories)
    for b, h in enumerate(histories):
        scores[b, h] = -torch.inf
    teacher.top1 = float(scores.max(dim=1).values.clamp(min=1e-12).mean())
    return teacher
