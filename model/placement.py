"""Where a new item goes in a trained model's head, from its text alone.

A live item (POST /items) gets its token from its title with the function that starts items in training
(model.initialise.text_vector), so a prompt that holds it reads what training would have started it at.
What the head scores it by depends on the head (docs/benchmarks.md, "Cold start", measures each):

    tied head (the paper's)       the token is the output vector; nothing else to place
    offsets, no readout           the similarity-weighted mean of the head rows of the NEIGHBOURS catalogue
                                  items whose texts are nearest by tf-idf cosine (text_neighbours)
    readout (the cpu recipe)      the rows of the average catalogue item, plus a text term in the readout
                                  block that reads the mean of the prompt's item tokens (TextReadout)

The text term: that block scores m_u . R_j, m_u the mean of the tokens of user u's prompt items. With
R_j = (E'E + r I)^-1 E' c_j (E the catalogue's tokens, c_j the tf-idf cosines of j's text to the catalogue
items' texts, model.teachers.text_matrix as the teacher reads them) m_u . R_j is about the mean cosine of
j's text to the prompt's items: the score of a text-only recommender, through CLLM4Rec's own forward pass
and head. Ranked among new items it is 6-8x the neighbour mean, which scores like its neighbours'
average. How it competes with the catalogue is fitted once per loaded model (fit_new_items): its scale
and a shift of the bias, by maximum likelihood of users' validation items from their served prompts when a
random tenth of the catalogue is scored as new items are, so new items get about the share of the users'
choices that items of their text similarity get.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from scipy.optimize import minimize

from model.cllm4rec import CLLM4Rec, HeadRows, inference_autocast, pad
from model.data import Split
from model.prompts import TokenSpace, build_recommend_prompt
from model.teachers import tfidf_rows, word_sets

# How many nearest catalogue items a new item's head rows average, for a head with offsets and no readout
# (measured in docs/benchmarks.md, "Cold start"): enough that one odd title among them does not decide it.
NEIGHBOURS = 20
# Ridge of the projection from text cosines to the token-mean readout block, relative to the mean diagonal
# of E'E: the cold-start probe's Recall@20 moved from 0.3150 at 1e-3 to 0.3109 at 1e-1 (amazon-scientific).
PROJECTION_RIDGE = 1e-3
# Users whose served prompts and validation items fit the text term's scale and shift (a seeded sample):
# two numbers, which a few hundred users pin down; it costs one forward pass of that many prompts.
CALIBRATION_USERS = 512
CALIBRATION_BATCH = 64
# The worlds the text term's scale and shift are fitted in (fit_new_items): each scores a random share of
# the catalogue as new items; a few draws of a tenth give a few hundred held-out items scored as new.
NEW_ITEM_DRAWS = 8
NEW_ITEM_SHARE = 0.1
MASKED = -1e30  # the score of a masked new item in the fit: -inf would make an all-masked row's gradient NaN


class CatalogueTexts:
    """The catalogue's texts, tokenized once: a POST /items spent 150 of its 190 ms tokenizing amazon-
    scientific's 4,344 descriptions again (docs/benchmarks.md, "Live items without a stall")."""

    def __init__(self, texts: Sequence[str]):
        self.vocabulary: dict[str, int] = {}
        self.words = word_sets(texts, self.vocabulary)

    def similarities(self, new_texts: Sequence[str]) -> np.ndarray:
        """[N, J] tf-idf cosines of each new text to each catalogue text (the teacher's text similarity:
        model.teachers.text_matrix of the catalogue's texts and the new ones together)."""
        vocabulary = dict(self.vocabulary)  # the new texts' words stay out of the catalogue's own
        new_words = word_sets(new_texts, vocabulary)
        catalogue_words = self.words.copy()
        catalogue_words.resize(self.words.shape[0], len(vocabulary))
        tfidf = tfidf_rows(sp.vstack([catalogue_words, new_words]).tocsr())
        return (tfidf[self.words.shape[0]:] @ tfidf[: self.words.shape[0]].T).toarray()

    def matrix(self) -> sp.csr_matrix:
        """The catalogue's own tf-idf rows (model.teachers.text_matrix of its texts)."""
        return tfidf_rows(self.words)


def average_rows(model: CLLM4Rec, n_catalogue: int, tokens: torch.Tensor) -> HeadRows:
    """The rows of the average of the first n_catalogue items for items with these tokens: the mean output
    vector (token + offset), readout row and bias; an item with them scores the mean of a prompt's logits
    over those items. The means are taken in float32 (torch sums in cascades) and widened after: a float64
    copy of a readout table first took 160 of the 290 ms of a POST /items at amazon-beauty's 12k items."""
    outputs = model.output_vectors()[:n_catalogue].mean(0).double()
    return HeadRows(outputs - tokens.double(),
                    model.head_readout[:n_catalogue].mean(0).double().expand(len(tokens), -1).clone(),
                    model.item_bias[:n_catalogue].detach().mean().double().expand(len(tokens)).clone())


def text_neighbours(similarities: np.ndarray, k: int = NEIGHBOURS) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each row of CatalogueTexts.similarities, (indices, weights) of its k nearest catalogue items, the weights
    proportional to the cosine and summing to 1; both empty where it shares no word with them."""
    neighbours = []
    for row in similarities:
        nearest = np.argsort(-row, kind="stable")[:k]
        nearest = nearest[row[nearest] > 0]
        neighbours.append((nearest, row[nearest] / row[nearest].sum() if len(nearest) else row[nearest]))
    return neighbours


@torch.no_grad()
def neighbour_rows(model: CLLM4Rec, tokens: torch.Tensor, similarities: np.ndarray) -> HeadRows:
    """Head rows of new items as the weighted mean of their text neighbours' (an item sharing no word with
    the catalogue: the average item's); the bias stays the average item's, popularity is not in a text."""
    rows = average_rows(model, similarities.shape[1], tokens)
    outputs = model.output_vectors().double()
    for row, (index, weights) in enumerate(text_neighbours(similarities)):
        if len(index):
            index, weights = torch.as_tensor(index, dtype=torch.long), torch.as_tensor(weights).double()
            rows.offsets[row] = weights @ outputs[index] - tokens[row].double()
            rows.readout[row] = weights @ model.head_readout[index].double()
    return rows


@dataclass
class TextReadout:
    """The text term of a readout head, fitted once per loaded model: new items' rows are the average
    catalogue item's plus scale x (R_j - mean R) in the token-mean block and shift on the bias (the
    module's docstring)."""

    projection: torch.Tensor  # [H, J] (E'E + r I)^-1 E', float64
    mean_term: torch.Tensor  # [H] the projection of the catalogue items' mean cosine vector
    scale: float  # of the text term against the catalogue's scores
    shift: float  # of a new item's score from the average item's, besides the text term

    @classmethod
    @torch.no_grad()
    def fit(cls, model: CLLM4Rec, space: TokenSpace, split: Split, max_history: int, catalogue: CatalogueTexts,
            seed: int = 0) -> TextReadout:
        """From the model's first len(catalogue's texts) items (the trained catalogue) and a sample of the users
        with validation items: the served prompt of their training items, their validation items scored as
        if they were new (model/placement.py's docstring)."""
        tfidf = catalogue.matrix()
        n = tfidf.shape[0]
        tokens = model.collab_items.weight[:n].detach().double()
        gram = tokens.T @ tokens
        gram.diagonal().add_(PROJECTION_RIDGE * float(gram.diagonal().mean()))
        projection = torch.linalg.solve(gram, tokens.T)
        self_similarity = np.asarray(tfidf.multiply(tfidf).sum(axis=1)).ravel()  # 1, or 0 for an empty text

        def text_terms(weights: np.ndarray) -> np.ndarray:
            """[B, J] weights @ C, C the catalogue's cosines to itself without its diagonal (a new item is
            not among the items it is compared with)."""
            return np.asarray(tfidf @ (tfidf.T @ weights.T)).T - weights * self_similarity

        mean_term = projection @ torch.from_numpy(text_terms(np.full((1, n), 1.0 / n))[0])
        users = [u for u, items in enumerate(split.val) if len(items) and len(split.train[u])]
        users = sorted(np.random.default_rng(seed).choice(users, min(CALIBRATION_USERS, len(users)),
                                                          replace=False).tolist())
        scores, terms, averages = [], [], []
        device = model.collab_items.weight.device
        for start in range(0, len(users), CALIBRATION_BATCH):
            batch = users[start : start + CALIBRATION_BATCH]
            ids, mask = pad([build_recommend_prompt(space, u, split.train[u].tolist(), max_history) for u in batch])
            with inference_autocast(model):
                last, readout_states = model.prompt_states(ids.to(device), mask.to(device))
                batch_scores = model.item_logits(last, readout_states)[:, :n].double().cpu()
            batch_terms = torch.from_numpy(text_terms((readout_states[:, model.token_mean_columns()].double().cpu()
                                                       @ projection).numpy()))
            averages.append(batch_scores.mean(1))  # what the average item's rows score for each prompt
            for row, u in enumerate(batch):
                batch_scores[row, torch.as_tensor(split.train[u], dtype=torch.long)] = -torch.inf  # as served
            scores.append(batch_scores)
            terms.append(batch_terms - batch_terms.mean(1, keepdim=True))
        held_out = [(row, int(item)) for row, u in enumerate(users) for item in split.val[u]]
        if not held_out:  # no validation items (a catalogue too small to split): nothing to fit the text on
            return cls(projection, mean_term, 0.0, 0.0)
        rows, targets = (torch.as_tensor(column) for column in zip(*held_out))
        scale, shift = fit_new_items(torch.cat(scores)[rows], torch.cat(terms)[rows], torch.cat(averages)[rows],
                                     targets, np.random.default_rng([seed, 1]))
        return cls(projection, mean_term, scale, shift)

    @torch.no_grad()
    def rows(self, model: CLLM4Rec, tokens: torch.Tensor, similarities: np.ndarray) -> HeadRows:
        rows = average_rows(model, similarities.shape[1], tokens)
        terms = torch.from_numpy(similarities) @ self.projection.T - self.mean_term  # [N, H]
        rows.readout[:, model.token_mean_columns()] += self.scale * terms
        rows.bias += self.shift
        return rows


def fit_new_items(scores: torch.Tensor, terms: torch.Tensor, averages: torch.Tensor, targets: torch.Tensor,
                  rng: np.random.Generator) -> tuple[float, float]:
    """(scale >= 0, shift) of the text term by maximum likelihood: in NEW_ITEM_DRAWS worlds, a random
    NEW_ITEM_SHARE of the catalogue is scored as new items are (average + scale x term + shift) and the
    rest by their own scores [P, J] (-inf where masked); each prompt's held-out item (targets [P]) is to
    be chosen by the softmax over both. A shift too high gives the new items more of the users' choices than
    they get, too low less, so the likelihood calibrates new items against the catalogue; concave in both."""
    draws = []
    rows = torch.arange(len(targets))
    for _ in range(NEW_ITEM_DRAWS):
        is_new = torch.from_numpy(rng.random(scores.shape[1]) < NEW_ITEM_SHARE)
        draws.append((torch.logsumexp(scores[:, ~is_new], 1),  # the catalogue's own share
                      terms[:, is_new], torch.isneginf(scores[:, is_new]),
                      is_new[targets], terms[rows, targets], scores[rows, targets]))

    def loss(parameters: np.ndarray) -> tuple[float, np.ndarray]:
        parameters = torch.tensor(parameters, dtype=torch.float64, requires_grad=True)
        with torch.enable_grad():  # the fit runs under no_grad
            scale, shift = parameters
            total = torch.zeros((), dtype=torch.float64)
            for kept, new_terms, masked, target_is_new, target_terms, target_scores in draws:
                placed = torch.where(masked, MASKED, averages[:, None] + scale * new_terms + shift)
                chosen = torch.where(target_is_new, averages + scale * target_terms + shift, target_scores)
                total = total - (chosen - torch.logaddexp(kept, torch.logsumexp(placed, 1))).sum()
            total.backward()
        return float(total), parameters.grad.numpy().copy()

    result = minimize(loss, np.zeros(2), jac=True, method="L-BFGS-B", bounds=[(0.0, None), (None, None)])
    return float(result.x[0]), float(result.x[1])


def head_rows(model: CLLM4Rec, tokens: torch.Tensor, similarities: np.ndarray, text_readout: TextReadout | None
              ) -> HeadRows:
    """New items' rows for this model's head (the table in the module's docstring), from their tokens and
    CatalogueTexts.similarities; a readout head needs its fitted TextReadout."""
    if model.has_head_readout:
        return text_readout.rows(model, tokens, similarities)
    if model.has_head_offsets:
        return neighbour_rows(model, tokens, similarities)
    return average_rows(model, similarities.shape[1], tokens)
