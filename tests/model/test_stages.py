"""Each stage of the method learns over a frozen backbone (GPT-2 and Llama families)."""

import pytest
import torch

from model.backbone import load_backbone
from model.cllm4rec import COLLAB, CONTENT, CLLM4Rec, collate_documents, collate_recommend
from model.optimisation import make_optimizers
from model.prompts import (PromptTemplates, TokenSpace, build_collaborative_document, build_content_documents,
                           build_recommend_prompt)

N_USERS, N_ITEMS = 8, 12


def setup(backbone_dir):
    backbone, tokenizer = load_backbone(str(backbone_dir))
    torch.manual_seed(0)
    model = CLLM4Rec(backbone, N_USERS, N_ITEMS)
    space = TokenSpace(tokenizer, model.n_words, N_USERS, N_ITEMS, PromptTemplates())
    return model, space


def user_items(u):
    return [(3 * u + k) % N_ITEMS for k in range(4)]


def losses_over_steps(model, tables, loss_of, steps=25, lr=1e-2):
    optimizers = make_optimizers(tables, lr)
    losses = []
    for _ in range(steps):
        loss = loss_of()
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(params=["tiny_llama", "tiny_gpt2"])
def model_and_space(request):
    return setup(request.getfixturevalue(request.param))


def test_backbone_stays_frozen_and_only_soft_tokens_and_the_head_train(model_and_space):
    model, _ = model_and_space
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"collab_users.weight", "collab_items.weight", "content_users.weight", "content_items.weight",
                         "item_bias", "logit_scale", "head_projection", "head_offsets"}
    assert model.head_offsets.numel() == 0  # without --head-offsets the head is tied: no offset rows


def test_collaborative_lm_loss_falls(model_and_space):
    model, space = model_and_space
    batch = collate_documents([build_collaborative_document(space, u, user_items(u)) for u in range(N_USERS)],
                              space.n_words + space.n_users)
    frozen_before = model.backbone.get_input_embeddings().weight.clone()
    losses = losses_over_steps(model, model.tables(COLLAB), lambda: model.collaborative_nll(batch) / batch.n_targets)
    assert losses[-1] < 0.7 * losses[0]
    assert torch.equal(model.backbone.get_input_embeddings().weight, frozen_before)


def test_content_lm_loss_falls(model_and_space):
    model, space = model_and_space
    reviews = {(u, user_items(u)[0]): f"I use this for {'coffee' if u % 2 else 'hiking'} works great"
               for u in range(N_USERS)}
    batch = collate_documents(build_content_documents(space, reviews, ["classic tripod"] * N_ITEMS, 16), 0)
    losses = losses_over_steps(model, model.tables(CONTENT), lambda: model.content_nll(batch) / batch.n_targets,
                               lr=5e-2)
    assert losses[-1] < 0.95 * losses[0]


def test_recommendation_loss_falls(model_and_space):
    model, space = model_and_space
    prompts = [build_recommend_prompt(space, u, user_items(u)[:2], max_history=10) for u in range(N_USERS)]
    targets = [user_items(u)[2:] for u in range(N_USERS)]
    batch = collate_recommend(prompts, targets, list(range(N_USERS)), [user_items(u)[:2] for u in range(N_USERS)],
                              N_ITEMS)
    losses = losses_over_steps(model, model.tables(COLLAB), lambda: model.recommend_nll(batch) / N_USERS)
    assert losses[-1] < 0.7 * losses[0]


def test_mutual_regularization_pulls_the_two_views_together(tiny_llama):
    model, _ = setup(tiny_llama)
    users, items = torch.arange(N_USERS), torch.arange(N_ITEMS)

    def distance():
        return (model.collab_items.weight - model.content_items.weight).norm().item()

    before = distance()
    content_before = model.content_items.weight.clone()
    losses_over_steps(model, model.tables(COLLAB), lambda: model.mutual_regularization(COLLAB, users, items), steps=10)
    assert distance() < 0.8 * before
    assert torch.equal(model.content_items.weight, content_before)  # the other side is held fixed
    middle = distance()
    collab_before = model.collab_items.weight.clone()
    losses_over_steps(model, model.tables(CONTENT), lambda: model.mutual_regularization(CONTENT, users, items),
                      steps=10)
    assert distance() < 0.8 * middle
    assert torch.equal(model.collab_items.weight, collab_before)


def test_item_head_is_tied_to_the_collaborative_item_embeddings(tiny_llama):
    model, _ = setup(tiny_llama)
    hidden = torch.randn(3, model.collab_items.embedding_dim)
    assert torch.allclose(model.item_logits(hidden), hidden @ model.collab_items.weight.T)  # scale 1, bias 0 at start
    with torch.no_grad():
        model.logit_scale.fill_(2.5)
        model.item_bias.copy_(torch.arange(N_ITEMS, dtype=torch.float32))
    assert torch.allclose(model.item_logits(hidden), 2.5 * hidden @ model.collab_items.weight.T + model.item_bias)


def test_item_head_computes_in_float32_inside_autocast(tiny_llama):
    """bf16 logits tie items in the top k: the head leaves autocast (on CUDA it is on during scoring)."""
    model, _ = setup(tiny_llama)
    hidden = torch.randn(3, model.collab_items.embedding_dim)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.item_logits(hidden)
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, hidden @ model.collab_items.weight.T, atol=1e-5)


def test_recommendation_pass_regularizes_history_and_target_items(tiny_llama):
    model, space = setup(tiny_llama)
    batch = collate_recommend([build_recommend_prompt(space, 0, [1, 2], 10)], [[3, 4]], [0], [[1, 2]], N_ITEMS)
    assert batch.items.tolist() == [1, 2, 3, 4]
