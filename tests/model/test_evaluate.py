"""Ranking metrics against hand-computed cases, and the baselines on a toy split."""

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from model.data import Split
from model.evaluate import (ease_scorer, ease_weights, evaluate_scorer, interaction_matrix, most_popular_scorer,
                            ranking_metrics, sample_users)


def top_list(*items, width=100):
    """A ranking that starts with the given items, padded with item ids that are never held out."""
    rest = [1000 + i for i in range(width - len(items))]
    return list(items) + rest


def test_recall_and_ndcg_hand_computed():
    # User A: held out {1, 2}; ranked 1 first and 2 at position 30 (0-based 29).
    # User B: held out {5}; ranked at position 50 (0-based 49): outside top 40, inside top 100.
    a = top_list(1, *range(1000, 1028), 2)[:100]
    b = top_list(*range(2000, 2049), 5)[:100]
    metrics = ranking_metrics(np.array([a, b]), [np.array([1, 2]), np.array([5])])
    assert metrics["recall@20"] == pytest.approx((1 / 2 + 0) / 2)
    assert metrics["recall@40"] == pytest.approx((2 / 2 + 0) / 2)
    ndcg_a = (1 / math.log2(2) + 1 / math.log2(31)) / (1 / math.log2(2) + 1 / math.log2(3))
    ndcg_b = (1 / math.log2(51)) / 1.0
    assert metrics["ndcg@100"] == pytest.approx((ndcg_a + ndcg_b) / 2)


def test_recall_divides_by_min_of_k_and_heldout():
    held = np.arange(50)  # 50 held-out items, all ranked first
    metrics = ranking_metrics(np.array([np.arange(100)]), [held])
    assert metrics == pytest.approx({"recall@20": 1.0, "recall@40": 1.0, "ndcg@100": 1.0})


def test_catalogue_smaller_than_k():
    metrics = ranking_metrics(np.array([[3, 0, 1, 2]]), [np.array([2])])
    assert metrics["recall@20"] == 1.0
    assert metrics["ndcg@100"] == pytest.approx(1 / math.log2(5))


def toy_split():
    train = [np.array([0, 1]), np.array([0, 2]), np.array([1, 2])]
    val = [np.array([2]), np.array([3]), np.array([0])]
    test = [np.array([3]), np.array([1]), np.array([3])]
    return Split(train, val, test)


def test_known_items_are_excluded_and_test_input_includes_validation():
    split = toy_split()
    scores = torch.arange(4, dtype=torch.float32)  # item 3 best, then 2, 1, 0
    metrics = evaluate_scorer(lambda users: scores.expand(len(users), -1), split, "test", [0, 1, 2], batch_size=2)
    # user 0 knows {0,1,2} -> ranking [3]: hit. user 1 knows {0,2,3} -> [1]: hit. user 2 knows {1,2,0} -> [3]: hit.
    assert metrics["recall@20"] == 1.0
    assert metrics["ndcg@100"] == 1.0


def test_most_popular_counts_training_interactions():
    scorer = most_popular_scorer(toy_split(), 4)
    assert scorer([0])[0].tolist() == [2.0, 2.0, 2.0, 0.0]


def test_ease_matches_the_closed_form():
    split = toy_split()
    x = interaction_matrix(split, "val", 4).toarray()
    lam = 0.5
    p = np.linalg.inv(x.T @ x + lam * np.eye(4))
    expected = np.eye(4) - p / np.diag(p)
    np.fill_diagonal(expected, 0.0)
    assert np.allclose(ease_weights(interaction_matrix(split, "val", 4), lam).numpy(), expected, atol=1e-5)
    scores = ease_scorer(split, "val", 4, lam)([0, 2])
    assert np.allclose(scores.numpy(), x[[0, 2]] @ expected, atol=1e-5)


def test_user_samples_are_fixed_sorted_subsets():
    users = list(range(0, 500, 3))
    sample = sample_users(users, 20, seed=4)
    assert sample == sample_users(users, 20, seed=4) and sample != sample_users(users, 20, seed=5)
    assert len(sample) == 20 and sample == sorted(sample) and set(sample) <= set(users)
    assert sample_users(users, 0, seed=4) == users and sample_users(users, 1000, seed=4) == users


def test_ease_weights_are_row_major_for_fast_scoring():
    """scipy's sparse @ dense copies a column-major dense operand on every call."""
    train = sp.random(40, 30, density=0.2, format="csr", dtype=np.float32, random_state=0)
    assert ease_weights(train, 10.0).numpy().flags["C_CONTIGUOUS"]
