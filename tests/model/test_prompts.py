"""Soft+hard prompts: user/item tokens are atomic, text round-trips, templates render as training expects."""

import pytest
from transformers import AutoTokenizer

from model.prompts import (PromptTemplates, TokenSpace, build_collaborative_document, build_content_documents,
                           build_recommend_prompt)

N_USERS, N_ITEMS = 5, 7


@pytest.fixture(scope="module")
def space(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    return TokenSpace(tokenizer, len(tokenizer), N_USERS, N_ITEMS, PromptTemplates())


def test_soft_tokens_follow_the_word_vocabulary(space):
    n = space.n_words
    assert space.user_token(0) == n and space.user_token(4) == n + 4
    assert space.item_token(0) == n + N_USERS and space.item_token(6) == n + N_USERS + 6


def test_encode_decode_round_trip_keeps_soft_tokens_atomic(space):
    text = "<user_3> has interacted with <item_0> <item_6> <item_2>, <user_3> will interact with"
    ids = space.encode(text)
    soft = [t for t in ids if t >= space.n_words]
    assert soft == [space.user_token(3), space.item_token(0), space.item_token(6), space.item_token(2),
                    space.user_token(3)]
    assert space.decode(ids) == text
    assert space.encode(space.decode(ids)) == ids


def test_encode_rejects_unknown_soft_tokens(space):
    with pytest.raises(ValueError, match="beyond the 7 items"):
        space.encode("<user_1> likes <item_7>")


def test_recommend_prompt_matches_the_template_and_keeps_the_most_recent_items(space):
    prompt = build_recommend_prompt(space, 2, [0, 1, 2, 3, 4], max_history=3)
    assert space.decode(prompt) == "<user_2> has interacted with <item_2> <item_3> <item_4>, <user_2> will interact with"
    anonymous = build_recommend_prompt(space, None, [5], max_history=3)
    assert space.decode(anonymous) == "a user has interacted with <item_5>, the user will interact with"
    assert all(t < space.n_words or t == space.item_token(5) for t in anonymous)


def test_stage_documents(space):
    collab = build_collaborative_document(space, 1, [4, 2])
    assert space.decode(collab.prompt) == "<user_1> has interacted with"
    assert collab.main == [space.item_token(4), space.item_token(2)]
    assert (collab.users, collab.items) == ([1], [4, 2])

    documents = build_content_documents(space, {(0, 3): "works great"}, ["", "classic tripod", ""], max_tokens=64)
    review, item_text = documents
    assert space.decode(review.prompt) == "<user_0> writes the following review for <item_3>:"
    assert space.decode(review.main).strip() == "works great"
    assert space.decode(item_text.prompt) == "<item_1> is described as:"
    assert (item_text.users, item_text.items) == ([], [1])
    short = build_content_documents(space, {(0, 3): "works great " * 20}, [""] * 3, max_tokens=5)
    assert len(short[0].main) == 5
