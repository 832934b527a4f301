"""Items added after training (POST /items): where model/placement.py puts them in each kind of head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.backbone import load_backbone
from model.cllm4rec import CLLM4Rec, score_prompts
from model.data import Split
from model.placement import CatalogueTexts, TextReadout, head_rows, text_neighbours
from model.prompts import PromptTemplates, TokenSpace, build_recommend_prompt
from model.teachers import text_matrix

# Pairs of items sharing two words; words of one item (and the fillers) carry no similarity
# (model.teachers.text_matrix), so each pair's texts are one tf-idf vector, and so is a new item's
# text with the same two words.
TOPICS = ["espresso roast", "garden hose", "yoga mat", "guitar strings", "trail shoes", "bread flour"]
CATALOGUE = [f"{topic} {kind}{n}" for n, topic in enumerate(TOPICS) for kind in ("deluxe", "classic")] + \
    [f"filler{n}" for n in range(18)]  # 30 items: fewer than the tiny backbone's 32 hidden dimensions


def text_recommender(tiny_llama, gain: float) -> tuple[CLLM4Rec, TokenSpace, Split]:
    """A readout head that is a text-only recommender: item k scores gain x the mean tf-idf cosine of its
    text to the prompt's items (through the readout block of the mean item token; exact, since the
    catalogue's tokens are independent), nothing else. Its 40 users bought one item of a pair and a filler
    (training), then, three in four of them, the pair's other item (the rest another filler; validation):
    their next items follow the text, as a shop's do, and not always."""
    backbone, tokenizer = load_backbone(str(tiny_llama))
    torch.manual_seed(0)
    n = len(CATALOGUE)
    model = CLLM4Rec(backbone, 40, n, init_std=1.0, head_offsets=True, head_readout=True)
    tfidf = text_matrix(CATALOGUE)
    cosines = torch.from_numpy((tfidf @ tfidf.T).toarray())
    cosines.fill_diagonal_(0)
    tokens = model.collab_items.weight.detach().double()
    with torch.no_grad():
        model.head_offsets.copy_(-model.collab_items.weight)  # output vectors 0: the last state reads nothing
        model.head_readout[:, model.token_mean_columns()] = gain * (torch.linalg.pinv(tokens) @ cosines).T.float()
    space = TokenSpace(tokenizer, model.n_words, 40, n, PromptTemplates())
    rng = np.random.default_rng(0)
    train, val = [], []
    for u in range(40):
        first, second = rng.permutation(2) + 2 * rng.integers(len(TOPICS))
        fillers = rng.choice(np.arange(2 * len(TOPICS), n), 2, replace=False)
        train.append(np.array([first, fillers[0]]))
        val.append(np.array([second if u % 4 else fillers[1]]))
    return model, space, Split(train, val, [np.array([], dtype=np.int64)] * 40)


def test_a_new_item_of_the_prompts_topic_ranks_at_the_top_of_a_text_driven_catalogue(tiny_llama):
    """The readout head's text term for new items is fitted on the catalogue's own scores and its users'
    next items: in a catalogue whose users follow the text, a new item whose text matches the prompt's
    ranks with the prompt topic's catalogue item at the top, and one sharing no word with the catalogue
    ranks below that item."""
    model, space, split = text_recommender(tiny_llama, gain=3.0)
    text_readout = TextReadout.fit(model, space, split, 10, CatalogueTexts(CATALOGUE))
    assert text_readout.scale > 0
    tokens = torch.randn(2, model.hidden_size)
    n = len(CATALOGUE)
    new_texts = ["espresso roast grinder", "violin bow rosin"]
    model.add_items(tokens, head_rows(model, tokens, CatalogueTexts(CATALOGUE).similarities(new_texts), text_readout))
    scores = score_prompts(model, [build_recommend_prompt(space, 0, [0, 14], 10)])[0]  # espresso, a filler
    scores[[0, 14]] = -torch.inf  # the prompt's own, as served
    assert set(torch.argsort(scores, descending=True)[:2].tolist()) == {1, n}  # "espresso roast classic0"
    assert scores[n + 1] < scores[1]


def test_a_head_with_offsets_alone_places_an_item_among_its_nearest_texts(tiny_llama):
    """Without a readout there is no text term: a new item whose text shares words with catalogue items gets
    the similarity-weighted mean of their output vectors (its token stays its own); one sharing no word, and
    every new item's bias, the average catalogue item's."""
    neighbours = text_neighbours(CatalogueTexts(CATALOGUE).similarities(["espresso roast grinder",
                                                                          "violin bow rosin"]), k=3)
    (index, weights), (no_index, _) = neighbours
    assert sorted(index.tolist()) == [0, 1] and weights.sum() == pytest.approx(1.0)  # the espresso pair
    assert len(no_index) == 0
    backbone, _ = load_backbone(str(tiny_llama))
    torch.manual_seed(0)
    n = len(CATALOGUE)
    model = CLLM4Rec(backbone, 2, n, head_offsets=True)
    with torch.no_grad():
        model.head_offsets.normal_()
        model.item_bias.normal_()
    outputs = (model.collab_items.weight + model.head_offsets).detach().clone()
    new = torch.randn(2, model.hidden_size)
    similarities = CatalogueTexts(CATALOGUE).similarities(["espresso roast grinder", "violin bow rosin"])
    model.add_items(new, head_rows(model, new, similarities, None))
    assert torch.equal(model.collab_items.weight[n], new[0])  # the token is its text's
    assert torch.allclose(model.collab_items.weight[n] + model.head_offsets[n], outputs[:2].mean(0), atol=1e-5)
    assert torch.allclose(model.collab_items.weight[n + 1] + model.head_offsets[n + 1], outputs.mean(0), atol=1e-5)
    assert torch.allclose(model.item_bias[n:], model.item_bias[:n].mean().expand(2), atol=1e-6)


def test_items_added_one_after_another_keep_every_row_and_take_spare_rows_in_place(tiny_llama):
    """Each addition keeps the catalogue's rows and the earlier additions' exactly and scores as the same
    tables made whole would; after the first, the tables grow into rows kept spare instead of being copied."""
    backbone, _ = load_backbone(str(tiny_llama))
    torch.manual_seed(0)
    model = CLLM4Rec(backbone, 2, 6, head_offsets=True, head_readout=True)
    with torch.no_grad():
        for table in (model.head_offsets, model.head_readout, model.item_bias):
            table.normal_()
    before = {name: getattr(model, name).detach().clone() for name in ("head_offsets", "head_readout", "item_bias")}
    before["items"] = model.collab_items.weight.detach().clone()
    added = []
    for round_ in range(3):
        new = torch.randn(2, model.hidden_size)
        no_text = TextReadout(torch.zeros(model.hidden_size, 6, dtype=torch.float64),
                              torch.zeros(model.hidden_size, dtype=torch.float64), 1.0, 0.0)
        rows = head_rows(model, new, np.zeros((2, 6)), no_text)
        start = model.head_readout.data_ptr()
        model.add_items(new, rows)
        added.append((new, rows))
        if round_ > 0:
            assert model.head_readout.data_ptr() == start  # written in place, not copied
    assert model.n_items == 12 and model.collab_items.num_embeddings == 12
    assert torch.equal(model.collab_items.weight[:6], before["items"])
    for name in ("head_offsets", "head_readout", "item_bias"):
        assert torch.equal(getattr(model, name)[:6], before[name]), name
    for i, (new, rows) in enumerate(added):
        assert torch.equal(model.collab_items.weight[6 + 2 * i : 8 + 2 * i], new)
        assert torch.equal(model.head_readout[6 + 2 * i : 8 + 2 * i], rows.readout.float())
        assert torch.equal(model.item_bias[6 + 2 * i : 8 + 2 * i], rows.bias.float())
    hidden = torch.randn(3, model.hidden_size)
    readout_states = torch.randn(3, model.head_readout.shape[1])
    whole = (hidden @ model.head_projection.T) @ (model.collab_items.weight + model.head_offsets).clone().T
    whole = model.logit_scale * whole + model.item_bias.clone() + readout_states @ model.head_readout.clone().T
    torch.testing.assert_close(model.item_logits(hidden, readout_states), whole.detach())


def test_the_catalogue_tokenized_once_gives_the_teachers_similarities_call_after_call():
    """CatalogueTexts keeps the catalogue's words between additions: each call's cosines are text_matrix's
    over the catalogue and that call's texts together, whatever words earlier calls brought."""
    catalogue = CatalogueTexts(CATALOGUE)
    for new_texts in (["espresso roast grinder", "violin bow rosin"], ["violin bow case", "yoga mat bag"],
                      ["espresso roast grinder"]):
        tfidf = text_matrix([*CATALOGUE, *new_texts])
        expected = (tfidf[len(CATALOGUE):] @ tfidf[: len(CATALOGUE)].T).toarray()
        np.testing.assert_allclose(catalogue.similarities(new_texts), expected, rtol=1e-12, atol=1e-12)
    assert "violin" not in catalogue.vocabulary
