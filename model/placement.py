"""Where a new item goes in a trained model's head: among the catalogue items whose text is nearest.

A live item (POST /items) gets its token from its text with the function that starts items in training
(model.initialise.text_vector), so a prompt that holds it reads what training would have started it at.
What the head scores it by is another matter: a trained head's output vectors and readout rows are what
finetuning and the refit made of the catalogue, and a mean of word embeddings says little about where
among them a product belongs (docs/benchmarks.md, "Cold start"). So a head with its own rows (offsets,
readout) gives a new item the similarity-weighted mean of the rows of the NEIGHBOURS catalogue items
whose titles are nearest by tf-idf cosine (model.teachers.text_matrix, the teacher's text similarity);
an item sharing no word with the catalogue keeps the map from tokens to head rows
(CLLM4Rec.predicted_head_rows).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from model.teachers import text_matrix

# How many nearest catalogue items a new item's head rows average (measured in docs/benchmarks.md, "Cold
# start"): enough that one odd title among them does not decide the placement.
NEIGHBOURS = 20


def text_neighbours(catalogue_texts: Sequence[str | None], new_texts: Sequence[str], k: int = NEIGHBOURS
                    ) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each new text, (indices, weights) of its k nearest catalogue texts by tf-idf cosine, the
    weights proportional to the cosine and summing to 1; both empty where it shares no word with them."""
    tfidf = text_matrix([*(text or "" for text in catalogue_texts), *new_texts])
    similarity = (tfidf[len(catalogue_texts):] @ tfidf[: len(catalogue_texts)].T).toarray()
    neighbours = []
    for row in similarity:
        nearest = np.argsort(-row, kind="stable")[:k]
        nearest = nearest[row[nearest] > 0]
        neighbours.append((nearest, row[nearest] / row[nearest].sum() if len(nearest) else row[nearest]))
    return neighbours
