"""Where the soft tokens start: from item text, from a factorisation of the training interactions, or both.

    text            an item with a title starts at the mean word embedding of its title's first words;
                    a user at the mean of their training items. The backbone then reads an item token as
                    a blend of its title's words from the first step, and the tied head scores an item
                    about as the LM scores its title words: a sensible zero-shot ranking instead of noise.
    collaborative   a rank-r truncated SVD of the normalised training matrix D_u^-1/2 X D_i^-1/2 gives
                    item factors V S^1/2 and user factors U S^1/2, so that user . item approximates the
                    normalised interactions. The factors are mapped into the backbone's embedding space:
                    onto the top r principal directions of the word embeddings, each coordinate at the
                    spread of the word embeddings along that direction, around their mean. The backbone
                    then reads a soft token as something word-like, and tokens of items bought together
                    start close.
    text+collaborative  the text vector plus the collaborative offset (tokens without a title: mean word
                    embedding plus the offset).

The paper starts every token at N(0, 0.02) and learns all of this over hundreds of GPU epochs, which a
CPU budget cannot afford; docs/training.md measures each choice. Both views start alike, so mutual
regularization starts at zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from model.cllm4rec import COLLAB, CONTENT, CLLM4Rec
from model.data import Dataset, Split
from model.evaluate import interaction_matrix

INITIALISERS = ("random", "text", "collaborative", "text+collaborative")
TITLE_TOKENS = 32  # words of a title that make its vector


@dataclass
class Factorisation:
    users: torch.Tensor  # [I, r]  U S^1/2
    items: torch.Tensor  # [J, r]  V S^1/2


def truncated_svd(matrix: sp.spmatrix, rank: int, seed: int = 0, niter: int = 6):
    """(U, s, V) of a rank-r randomised SVD of a sparse matrix, r at most min(shape) - 1; seeded."""
    coo = matrix.tocoo()
    rank = max(1, min(rank, min(matrix.shape) - 1))
    torch.manual_seed(seed)
    tensor = torch.sparse_coo_tensor(np.vstack([coo.row, coo.col]), torch.as_tensor(coo.data), matrix.shape,
                                     check_invariants=False)
    return torch.svd_lowrank(tensor, q=rank, niter=niter)


def factorise(split: Split, n_items: int, rank: int, seed: int = 0) -> Factorisation:
    """Rank-r truncated SVD of D_u^-1/2 X D_i^-1/2, X the users x items training matrix."""
    x = interaction_matrix(split, "val", n_items).astype(np.float64)  # rows: the training items
    d_users = np.asarray(x.sum(axis=1)).ravel()
    d_items = np.asarray(x.sum(axis=0)).ravel()
    normalised = sp.diags(1 / np.sqrt(np.maximum(d_users, 1))) @ x @ sp.diags(1 / np.sqrt(np.maximum(d_items, 1)))
    u, s, v = truncated_svd(normalised, rank, seed)
    root = s.sqrt()
    return Factorisation((u * root).float(), (v * root).float())


def embedding_frame(words: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean [H], principal directions [H, r], spread along each [r]) of the word embeddings."""
    words = words.float()
    mean = words.mean(0)
    _, s, v = torch.linalg.svd(words - mean, full_matrices=False)
    spread = s[:rank] / np.sqrt(len(words) - 1)
    return mean, v[:rank].T, spread


def to_embedding_space(factors: torch.Tensor, scale: torch.Tensor, directions: torch.Tensor,
                       spread: torch.Tensor) -> torch.Tensor:
    """Factor coordinates, each divided by `scale` (its spread over items), placed on the word
    embeddings' principal directions at their spread: an offset [n, H] from the mean word."""
    return (factors / scale * spread) @ directions.T


def text_vector(words: torch.Tensor, tokenizer, text: str) -> torch.Tensor | None:
    """The mean word embedding [H] of the text's first TITLE_TOKENS tokens; None for a text without any.
    Training starts items here (text_vectors); the server places items added live here too."""
    ids = tokenizer(text or "", add_special_tokens=False, truncation=True, max_length=TITLE_TOKENS)["input_ids"]
    return words[torch.as_tensor(ids, device=words.device)].mean(0) if ids else None


def text_vectors(model: CLLM4Rec, tokenizer, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """([J, H] mean word embedding of each item's title, [J] bool: the item has text)."""
    words = model.backbone.get_input_embeddings().weight.detach().float().cpu()
    texts = [title or text for title, text in zip(dataset.item_titles, dataset.item_texts)]
    vectors = words.mean(0).expand(len(texts), -1).clone()
    has_text = torch.zeros(len(texts), dtype=torch.bool)
    for item, text in enumerate(texts):
        vector = text_vector(words, tokenizer, text)
        if vector is not None:
            vectors[item], has_text[item] = vector, True
    return vectors, has_text


def initialise(model: CLLM4Rec, how: str, tokenizer, dataset: Dataset, split: Split, rank: int,
               seed: int = 0) -> str:
    """Set both views' user and item tables as `how` says (one of INITIALISERS); returns a line for the log.
    "random" leaves the N(0, init_std) start of the paper."""
    if how not in INITIALISERS:
        raise ValueError(f"unknown initialiser {how!r}; one of {', '.join(INITIALISERS)}")
    if how == "random":
        return "init: all tokens from N(0, init_std) (paper)"
    words = model.backbone.get_input_embeddings().weight.detach().float().cpu()
    lines = []
    if "text" in how:
        items, has_text = text_vectors(model, tokenizer, dataset)
        lines.append(f"{int(has_text.sum())} of {len(items)} items from their titles")
    else:
        items = words.mean(0).expand(model.n_items, -1).clone()
    users = None
    if "collaborative" in how:
        rank = min(rank, words.shape[1])
        factors = factorise(split, model.n_items, rank, seed)
        mean, directions, spread = embedding_frame(words, factors.items.shape[1])
        scale = factors.items.std(0).clamp(min=1e-12)  # one scale for users and items keeps user . item
        items = items + to_embedding_space(factors.items, scale, directions, spread)
        users = mean + to_embedding_space(factors.users, scale, directions, spread)
        lines.append(f"collaborative factors of rank {factors.items.shape[1]} on the word embeddings' "
                     "principal directions")
    if users is None:  # users at the mean of their training items
        users = words.mean(0).expand(model.n_users, -1).clone()
        for user, its in enumerate(split.train):
            if len(its):
                users[user] = items[torch.as_tensor(its)].mean(0)
        lines.append("users from their training items")
    with torch.no_grad():
        for view in (COLLAB, CONTENT):
            user_table, item_table = model.tables(view)
            user_table.weight.copy_(users)
            item_table.weight.copy_(items)
    return "init: " + "; ".join(lines)
