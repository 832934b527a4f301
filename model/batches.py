"""The training examples of each pass, rebuilt every epoch with fresh random choices.

    collaborative  one document per user: `<user> has interacted with` -> the training items, reshuffled
    recommend      one prompt per user: a random mask_ratio of the training items (at least one) held out
                   of the prompt, the rest shuffled into it; targets are the held-out or all items. A
                   share (unmasked_ratio) of the prompts hold every training item: the prompt the model
                   is validated and served with, on which the teacher's distribution is what to learn

Batches group examples of similar length (less padding, the same randomness per epoch).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from model.data import Split
from model.prompts import Document, TokenSpace, build_collaborative_document, build_recommend_prompt


def length_grouped_batches(lengths: Sequence[int], batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Random batches of similar lengths: shuffle, sort within windows of 50 batches, shuffle the
    batches. Less padding, so more useful tokens per second, while epochs stay random."""
    order = rng.permutation(len(lengths))
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort([lengths[i] for i in chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def collaborative_documents(space: TokenSpace, split: Split, max_items: int, rng: np.random.Generator) -> list[Document]:
    """One document per user with training items, item order reshuffled (stochastic reordering)."""
    documents = []
    for u, items in enumerate(split.train):
        if len(items):
            documents.append(build_collaborative_document(space, u, rng.permutation(items)[:max_items].tolist()))
    return documents


def recommend_examples(space: TokenSpace, split: Split, mask_ratio: float, targets: str, anonymous_ratio: float,
                       max_history: int, rng: np.random.Generator, unmasked_ratio: float = 0.0):
    """(prompt, targets, user, history) per user with training items."""
    examples = []
    for u, items in enumerate(split.train):
        if not len(items):
            continue
        items = rng.permutation(items)
        unmasked = unmasked_ratio > 0 and rng.random() < unmasked_ratio  # no draw at 0: the same epochs as before
        n_masked = 0 if unmasked else max(1, round(mask_ratio * len(items)))
        masked, history = items[:n_masked].tolist(), items[n_masked:].tolist()
        user = None if rng.random() < anonymous_ratio else u
        prompt = build_recommend_prompt(space, user, history, max_history)
        examples.append((prompt, masked if targets == "masked" else items.tolist(), user, history[-max_history:]))
    return examples
