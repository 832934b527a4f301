"""The quality levers do what they say: teacher, collaborative initialisation, recipes, time budget,
and the training run's bookkeeping (curves, validation of the right epochs, option checks)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from model.backbone import load_backbone
from model.checkpoint import METRICS_FILE, load_recommender, read_checkpoint
from model.cli import add_train_parser, train_config
from model.cllm4rec import COLLAB, CLLM4Rec
from model.config import TrainConfig
from model.data import Split, load_dataset, split_dataset
from model.evaluate import (EASE_LAMBDAS, evaluate_scorer, evaluation_users, interaction_matrix,
                            selection_score)
from model.initialise import embedding_frame, factorise, initialise
from model.placement import average_rows
from model.recipes import RECIPES
from model.synthetic import write_synthetic_dataset
from model.teachers import TEXT_WEIGHT_LAMBDA, TEXT_WEIGHTS, fit_teacher, teacher_texts
from model.train import TENSORBOARD_DIR, train
from service.cli import main as cli
import training_helpers

DOCS = Path(__file__).resolve().parents[2] / "docs" / "training.md"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("levers"), n_users=150, n_items=60, n_categories=6,
                                   min_items=6, max_items=12, seed=3, reviews=False)


def quick_config(data, out, backbone, **overrides):
    """Finetuning only (the shared quick run without its pretraining epoch)."""
    return training_helpers.quick_config(data, out, backbone, **{"pretrain_epochs": 0, **overrides})


# --- the teacher ----------------------------------------------------------------------------------

def test_teacher_never_reads_held_out_items(data):
    """Fitted with a fixed lambda, the teacher is the same whatever the validation and test parts hold."""
    dataset = load_dataset(data)
    split = split_dataset(dataset, seed=0)
    emptied = Split(split.train, [np.zeros(0, dtype=np.int64)] * len(split.train),
                    [np.zeros(0, dtype=np.int64)] * len(split.train))
    texts = dataset.item_titles
    for max_dense, weight in ((10**6, 0.0), (0, 0.0), (10**6, 1.0), (0, 1.0)):  # EASE and low-rank, with text or not
        a = fit_teacher(split, dataset.n_items, 200.0, max_dense, 16, [], texts, weight, seed=0)
        b = fit_teacher(emptied, dataset.n_items, 200.0, max_dense, 16, [], texts, weight, seed=0)
        history = [split.train[0].tolist(), split.train[1].tolist()]
        assert torch.allclose(a.scores(history), b.scores(history), atol=1e-6), a.kind
        distribution = a.distribution(history, 0.5)
        assert torch.allclose(distribution.sum(1), torch.ones(2))
        assert float(distribution[0, history[0]].sum()) == 0.0  # prompt items are not targets


def test_text_similarity_enters_the_teacher(data):
    """Two items with the same title and no shared user: only the text teacher links them."""
    dataset = load_dataset(data)
    split = split_dataset(dataset, seed=0)
    texts = [f"unrelated{i}" for i in range(dataset.n_items)]
    x = interaction_matrix(split, "val", dataset.n_items)
    co_users = (x.T @ x).toarray()
    a, b = next((a, b) for a in range(dataset.n_items) for b in range(a + 1, dataset.n_items) if co_users[a, b] == 0)
    texts[a] = texts[b] = "espresso burr grinder"
    plain = fit_teacher(split, dataset.n_items, 50.0, 10**6, 16, [], texts, 0.0, seed=0)
    with_text = fit_teacher(split, dataset.n_items, 50.0, 10**6, 16, [], texts, 3.0, seed=0)
    assert with_text.text_weight == 3.0 and plain.text_weight == 0.0
    assert with_text.weights[a, b] > 0.1 and abs(plain.weights[a, b]) < with_text.weights[a, b] / 10


def test_the_teachers_lambda_and_text_weight_are_the_validation_best(data):
    """No lambda given: without text the teacher's is the best of evaluate's grid on validation (as evaluate
    picks EASE's); with text the weight is the best at TEXT_WEIGHT_LAMBDA, then the lambda the best at that
    weight."""
    dataset = load_dataset(data)
    split = split_dataset(dataset, seed=0)
    users = evaluation_users(split, "val")
    known = interaction_matrix(split, "val", dataset.n_items)

    def score(teacher):
        return selection_score(evaluate_scorer(lambda batch: teacher.scores([known[u].indices.tolist() for u in batch]),
                                               split, "val", users, 256))

    plain = {lam: score(fit_teacher(split, dataset.n_items, lam, 10**6, 16, users, seed=0)) for lam in EASE_LAMBDAS}
    assert len(set(plain.values())) > 1  # the grid is a choice here
    picked = fit_teacher(split, dataset.n_items, None, 10**6, 16, users, seed=0)
    assert picked.lam == max(plain, key=plain.get) and picked.text_weight == 0.0
    texts = dataset.item_titles
    with_text = fit_teacher(split, dataset.n_items, None, 10**6, 16, users, texts, seed=0)
    by_weight = {weight: score(fit_teacher(split, dataset.n_items, TEXT_WEIGHT_LAMBDA, 10**6, 16, users, texts,
                                           weight, seed=0)) for weight in (0.0, *TEXT_WEIGHTS)}
    weight = max(by_weight, key=by_weight.get)
    by_lambda = {lam: score(fit_teacher(split, dataset.n_items, lam, 10**6, 16, users, texts, weight, seed=0))
                 for lam in EASE_LAMBDAS}
    assert (with_text.text_weight, with_text.lam) == (weight, max(by_lambda, key=by_lambda.get))
    assert score(with_text) == max(by_lambda.values()) >= max(by_weight.values())


def test_teacher_text_holds_the_reviews_of_training_pairs_only(tmp_path):
    """Each review carries a word of its own: the teacher's text of an item holds those of its training pairs
    and none of a validation or test pair's (a user's wording would tie their held-out items to the rest)."""
    rows = ["user_id,item_id,text"] + [f"u{u},i{(u * 7 + k) % 30},first{u}x{k} words" for u in range(40) for k in range(6)]
    (tmp_path / "reviews.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "items.csv").write_text("item_id,title\n" + "".join(f"i{i},thing {i}\n" for i in range(30)))
    dataset = load_dataset(tmp_path)
    split = split_dataset(dataset, seed=0)
    texts = teacher_texts(dataset, split)
    assert len(texts) == dataset.n_items
    for part in ("train", "val", "test"):
        for u, items in enumerate(split.part(part)):
            for item in items.tolist():
                word = dataset.reviews[(u, item)].split()[0]
                assert (word in texts[item].split()) == (part == "train"), (part, word)
    assert all(text.startswith(dataset.item_texts[i]) for i, text in enumerate(texts))


def test_ease_teacher_scores_are_sums_of_its_rows(data):
    dataset = load_dataset(data)
    split = split_dataset(dataset, seed=0)
    teacher = fit_teacher(split, dataset.n_items, 100.0, 10**6, 16, [], seed=0)
    history = split.train[4].tolist()
    assert torch.allclose(teacher.scores([history])[0], teacher.weights[history].sum(0), atol=1e-6)
    assert teacher.top1 > 0


def test_distillation_term_falls_during_training(data, tiny_llama, tmp_path):
    out = tmp_path / "distilled"
    train(quick_config(data, out, tiny_llama, finetune_epochs=4, distill_weight=1.0, distill_lambda=100.0))
    records = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    losses = [r["passes"]["recommend"]["nll_per_target"] for r in records]
    assert losses[-1] < losses[0], losses


# --- collaborative initialisation ------------------------------------------------------------------

def test_collaborative_init_reproduces_the_factorisation(data, tiny_llama):
    dataset = load_dataset(data)
    split = split_dataset(dataset, seed=0)
    backbone, tokenizer = load_backbone(str(tiny_llama))
    model = CLLM4Rec(backbone, dataset.n_users, dataset.n_items)
    rank = 8
    initialise(model, "collaborative", tokenizer, dataset, split, rank, seed=0)
    factors = factorise(split, dataset.n_items, rank, seed=0)
    words = backbone.get_input_embeddings().weight.detach()
    mean, directions, spread = embedding_frame(words, rank)
    # Read back: the coordinates on the word embeddings' principal directions, in units of their spread,
    # are the factors up to one common scale, so every user . item of the factorisation is kept.
    items = (model.collab_items.weight.detach() - mean) @ directions / spread
    users = (model.collab_users.weight.detach() - mean) @ directions / spread
    scale = factors.items.std(0)
    assert torch.allclose(items * scale, factors.items, atol=1e-4)
    assert torch.allclose(users * scale, factors.users, atol=1e-4)
    assert torch.equal(model.collab_items.weight, model.content_items.weight)
    # The factorisation itself: user . item approximates the normalised training matrix.
    x = interaction_matrix(split, "val", dataset.n_items).toarray()
    normalised = x / np.sqrt(np.maximum(x.sum(1, keepdims=True), 1)) / np.sqrt(np.maximum(x.sum(0, keepdims=True), 1))
    approx = (factors.users @ factors.items.T).numpy()
    assert np.linalg.norm(normalised - approx) < 0.9 * np.linalg.norm(normalised)


def test_text_and_collaborative_init_adds_the_offset_to_the_title_vector(data, tiny_llama):
    dataset = load_dataset(data)
    split = split_dataset(dataset, seed=0)
    backbone, tokenizer = load_backbone(str(tiny_llama))
    text, both = (CLLM4Rec(backbone, dataset.n_users, dataset.n_items) for _ in range(2))
    initialise(text, "text", tokenizer, dataset, split, 8)
    initialise(both, "collaborative", tokenizer, dataset, split, 8)
    collaborative_offset = both.collab_items.weight - backbone.get_input_embeddings().weight.mean(0)
    initialise(both, "text+collaborative", tokenizer, dataset, split, 8)
    assert torch.allclose(both.collab_items.weight, text.collab_items.weight + collaborative_offset, atol=1e-5)


# --- recipes, options and the run's bookkeeping ----------------------------------------------------

def parse_train(argv):
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers())
    return parser.parse_args(["train", "--data", "d", "--out", "o", *argv])


def test_recipe_sets_its_options_and_explicit_options_override_it():
    config = train_config(parse_train(["--recipe", "cpu", "--finetune-lr", "5e-4", "--no-head-bias"]))
    for name, value in RECIPES["cpu"].items():
        if name not in ("finetune_lr", "head_bias"):
            assert getattr(config, name) == value, name
    assert config.finetune_lr == 5e-4 and config.head_bias is False
    assert train_config(parse_train([])) == TrainConfig(data="d", out="o")


def test_docs_state_what_each_recipe_sets():
    """docs/training.md's recipe table lists every option of every recipe with its value."""
    text = DOCS.read_text()
    rows = dict(re.findall(r"^\| `--([a-z-]+)` \| ([^|]*)\|", text, flags=re.M))
    for recipe, options in RECIPES.items():
        table = re.search(rf"<!-- recipe {recipe} -->(.*?)<!-- /recipe -->", text, flags=re.S)
        assert table, f"no table for recipe {recipe}"
        documented = dict(re.findall(r"^\| `--([a-z-]+)` \| `([^`]*)` \|", table.group(1), flags=re.M))
        assert documented == {k.replace("_", "-"): str(v) for k, v in options.items()}, recipe
    assert rows  # the tables were found at all


def test_time_budget_stops_training_and_keeps_a_loadable_best_checkpoint(data, tiny_llama, tmp_path, capsys):
    out = tmp_path / "budget"
    train(quick_config(data, out, tiny_llama, finetune_epochs=10_000, patience=0, time_budget=0.25))
    assert "time budget of 0.25 min reached" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert 1 <= len(records) < 10_000
    recommender = load_recommender(out, "cpu")
    best = max(records, key=lambda r: r["score"])
    assert recommender.checkpoint.meta["metrics"]["epoch"] == best["epoch"]


def test_a_budget_too_short_for_an_epoch_still_ends_with_the_refitted_starting_model(data, tiny_llama, tmp_path,
                                                                                     capsys):
    # A budget that is over before the first epoch (data loading and the teacher take longer than 60 ms):
    # the refit of the model as initialised is validated and kept, rather than no checkpoint at all.
    out = tmp_path / "short"
    best = train(quick_config(data, out, tiny_llama, time_budget=0.001, head_offsets=True, head_refit=True,
                              head_readout=True, distill_weight=1.0))
    assert "reached after epoch 0" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert {r["stage"] for r in records} == {"refit"} and best["stage"] == "refit" and best["epoch"] == 0
    assert load_recommender(out, "cpu").model.has_head_readout


def test_curves_are_written_for_tensorboard(data, tiny_llama, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "curves"
    train(quick_config(data, out, tiny_llama, pretrain_epochs=1, finetune_epochs=2))
    events = EventAccumulator(str(out / TENSORBOARD_DIR))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"val/recall_20", "val/recall_40", "val/ndcg_100", "loss/recommend", "loss/collaborative",
            "lr/recommend"} <= set(tags)
    assert [e.step for e in events.Scalars("val/recall_20")] == [1, 2, 3]
    records = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert [e.value for e in events.Scalars("val/recall_20")] == pytest.approx([r["val"]["recall@20"] for r in records])


def test_content_epochs_are_not_validated_and_patience_zero_never_stops_early(tiny_llama, tmp_path):
    text_data = write_synthetic_dataset(tmp_path / "text", n_users=60, n_items=30, n_categories=3, min_items=5,
                                        max_items=8, seed=4)
    out = tmp_path / "ckpt"
    train(quick_config(text_data, out, tiny_llama, content_epochs=2, finetune_epochs=3, finetune_lr=1e-12,
                       patience=0, max_text_tokens=8))
    records = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert [r["stage"] for r in records] == ["content", "content", "finetune", "finetune", "finetune"]
    assert [r["val"] is None for r in records] == [True, True, False, False, False]


@pytest.mark.parametrize("option, message", [
    (["--val-users", "-1"], "--val-users must not be negative"),
    (["--patience", "-2"], "--patience must not be negative"),
    (["--init", "svd"], "--init must be one of"),
    (["--distill-temperature", "0"], "--distill-temperature must be positive"),
    (["--time-budget", "-5"], "--time-budget must not be negative"),
    (["--head-refit"], "--head-refit needs --head-offsets and a teacher"),
])
def test_bad_options_are_cli_errors(data, tmp_path, capsys, option, message):
    assert cli(["train", "--data", str(data), "--out", str(tmp_path / "o"), *option]) == 2
    assert message in capsys.readouterr().err


def test_lambda_v_weighs_the_same_means_on_every_stage(tiny_llama):
    """Each stage's loss is nll per target + lambda_V x regularization per document: duplicating a batch
    changes neither term, and lambda_V adds the mean per-document distance whatever the stage."""
    from model.cllm4rec import CONTENT, collate_documents, collate_recommend
    from model.prompts import (PromptTemplates, TokenSpace, build_collaborative_document,
                               build_content_documents, build_recommend_prompt)
    from model.train import stage_loss

    backbone, tokenizer = load_backbone(str(tiny_llama))
    torch.manual_seed(0)
    model = CLLM4Rec(backbone, 4, 6)
    space = TokenSpace(tokenizer, model.n_words, 4, 6, PromptTemplates())
    collaborative = [build_collaborative_document(space, u, [u, u + 1, u + 2]) for u in range(4)]
    content = build_content_documents(space, {(u, u): "works great good value" for u in range(4)}, [""] * 6, 8)
    prompts = [build_recommend_prompt(space, u, [u], 10) for u in range(4)]

    def batches(n):
        return {
            "collaborative": (COLLAB, model.collaborative_nll,
                              collate_documents(collaborative * n, space.n_words + space.n_users)),
            "content": (CONTENT, model.content_nll, collate_documents(content * n, 0)),
            "recommend": (COLLAB, model.recommend_nll,
                          collate_recommend(prompts * n, [[u + 1, u + 2] for u in range(4)] * n, list(range(4)) * n,
                                            [[u] for u in range(4)] * n, 6)),
        }

    with torch.no_grad():
        for stage, (view, nll_of, batch) in batches(1).items():
            _, _, double = batches(2)[stage]
            reg = model.mutual_regularization(view, batch.users, batch.items)
            per_document = float(reg) / len(batch.input_ids)
            losses = [float(stage_loss(nll_of(b), model.mutual_regularization(view, b.users, b.items),
                                       b.n_targets, len(b.input_ids), lam)) for b in (batch, double) for lam in (0, 2)]
            # The likelihood term is the mean per predicted item or word (documents of a stage differ in
            # length: a summed-per-document term would weigh lambda_V differently on each stage).
            assert batch.n_targets != len(batch.input_ids)
            assert losses[0] == pytest.approx(float(nll_of(batch)) / batch.n_targets, rel=1e-5), stage
            assert losses[0] == pytest.approx(losses[2], rel=1e-5), stage
            assert losses[1] - losses[0] == pytest.approx(2 * per_document, rel=1e-5), stage


def test_finetuning_starts_with_fresh_adam_moments(data, tiny_llama, tmp_path):
    from safetensors.torch import load_file

    from model.train import STATE_DIR

    out = tmp_path / "fresh"
    train(quick_config(data, out, tiny_llama, pretrain_epochs=2, finetune_epochs=1, batch_size=32))
    users = sum(1 for items in split_dataset(load_dataset(data), seed=0).train if len(items))
    steps_per_epoch = -(-users // 32)
    state = load_file(out / STATE_DIR / "optimizer_collab_1.safetensors")  # the item table's AdamW
    assert int(state["0.step"]) == steps_per_epoch  # finetuning's own steps, not pretraining's too


def test_without_input_gradients_nothing_flows_back_through_the_backbone(tiny_llama):
    from model.cllm4rec import collate_recommend
    from model.prompts import PromptTemplates, TokenSpace, build_recommend_prompt

    backbone, tokenizer = load_backbone(str(tiny_llama))
    model = CLLM4Rec(backbone, 4, 6)
    space = TokenSpace(tokenizer, model.n_words, 4, 6, PromptTemplates())
    batch = collate_recommend([build_recommend_prompt(space, u, [u], 10) for u in range(4)],
                              [[u + 1] for u in range(4)], list(range(4)), [[u] for u in range(4)], 6)
    for through_backbone in (True, False):
        model.zero_grad(set_to_none=True)
        model.input_gradients = through_backbone
        model.recommend_nll(batch).backward()
        assert (model.collab_users.weight.grad is not None) == through_backbone  # users appear only as inputs
        assert model.collab_items.weight.grad is not None  # the tied head trains the items either way


# --- the head's offsets and its refit in closed form --------------------------------------------------

@pytest.mark.parametrize("readout", [False, True], ids=["last-state", "item-states"])
def test_head_refit_is_the_least_squares_fit_of_the_targets_logits(data, tiny_llama, readout):
    """On the training users' whole-history prompts the refitted head's logits are the least-squares fit of
    the (centred) logits of finetuning's target from the features the head reads (with --head-readout the
    readout states too), whatever the trained projection and scale, and fit them better than the head did
    before."""
    from model.cllm4rec import pad
    from model.head_readout import head_features, refit_head, target_logits
    from model.prompts import PromptTemplates, TokenSpace, build_recommend_prompt

    dataset = load_dataset(data)
    split = split_dataset(dataset, seed=0)
    backbone, tokenizer = load_backbone(str(tiny_llama))
    torch.manual_seed(0)
    model = CLLM4Rec(backbone, dataset.n_users, dataset.n_items, head_offsets=True, head_readout=readout)
    space = TokenSpace(tokenizer, model.n_words, dataset.n_users, dataset.n_items, PromptTemplates())
    initialise(model, "text", tokenizer, dataset, split, model.hidden_size)
    with torch.no_grad():  # as if trained: a projection and a scale away from identity and 1
        model.head_projection.add_(0.1 * torch.randn_like(model.head_projection))
        model.logit_scale.fill_(3.0)
    teacher = fit_teacher(split, dataset.n_items, 200.0, 10**6, 16, [], seed=0)
    users = [u for u, items in enumerate(split.train) if len(items)]
    histories = [split.train[u].tolist() for u in users]
    ids, mask = pad([build_recommend_prompt(space, u, h, 50) for u, h in zip(users, histories)])
    target = target_logits(teacher, histories, 0.25, 1.0)
    # every user's row weighs alike in the fit: centred, at unit spread, whatever the history's length
    assert torch.allclose(target.mean(1), torch.zeros(len(users), dtype=torch.float64), atol=1e-9)
    assert torch.allclose(target.std(1), torch.ones(len(users), dtype=torch.float64))

    def head_error() -> float:
        with torch.no_grad():
            logits = model.prompt_item_logits(ids, mask).double()
        return float((logits - logits.mean(1, keepdim=True) - target).pow(2).mean())

    before = head_error()
    projection = model.head_projection.detach().clone()
    refit_head(model, space, split, teacher, 0.25, 1.0, 50, batch_size=32)
    assert torch.equal(model.head_projection, projection)  # only the offsets and the bias are refitted
    features = head_features(model, ids, mask).double()
    # The last state; with the readout the first block's output at the end, and the item positions' mean of
    # the embeddings and of both blocks' outputs: one hidden-wide block each.
    assert features.shape[1] == model.hidden_size * (1 + 4 * readout)
    features = torch.cat([features, torch.ones(len(users), 1, dtype=torch.float64)], 1)
    best = features @ torch.linalg.lstsq(features, target).solution
    # The optimum up to the solve's small ridge: the readout states of a tiny random model are nearly collinear
    # and outnumber its users (the least-squares fit interpolates them), where the ridge leaves a little.
    optimum = float((best - target).pow(2).mean())
    assert head_error() <= 1.01 * optimum + 1e-3 * float(target.pow(2).mean())
    assert head_error() < 0.5 * before


@pytest.mark.parametrize("readout", [False, True], ids=["last-state", "item-states"])
def test_refitted_head_is_validated_saved_and_served_with_the_same_scores(data, tiny_llama, tmp_path, capsys, readout):
    from model.evaluate import evaluate_cllm4rec
    from model.head_readout import REFIT_SHARES

    out = tmp_path / "refit"
    best = train(quick_config(data, out, tiny_llama, head_offsets=True, head_refit=True, distill_weight=1.0,
                              head_readout=readout))
    records = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert [r["stage"] for r in records] == ["finetune"] * 3 + ["refit"] * len(REFIT_SHARES)
    assert [r["share"] for r in records[3:]] == list(REFIT_SHARES)  # each mix of the heads validated
    best_epoch = max(records[:3], key=lambda r: r["score"])["epoch"]  # the refit reads the best epoch's model
    assert all(r["epoch"] == best_epoch for r in records[3:])
    assert f"head refitted in closed form on epoch {best_epoch}'s model" in capsys.readouterr().out
    checkpoint = read_checkpoint(out)
    assert checkpoint.meta["metrics"] == best
    recommender = load_recommender(out, "cpu")
    assert recommender.model.has_head_offsets
    assert recommender.model.has_head_readout == readout
    if readout and best["stage"] == "refit":
        assert float(recommender.model.head_readout.abs().max()) > 0  # the refit wrote it, the checkpoint kept it
    split = recommender.checkpoint.split
    users = [u for u, items in enumerate(split.val) if len(items)]
    # The checkpoint scores as validation measured it, whichever epoch (or the refit) was best.
    assert evaluate_cllm4rec(recommender.model, recommender.space, split, "val", users, recommender.max_history,
                             64) == pytest.approx(best["val"], abs=1e-6)


def test_scores_follow_every_change_of_the_head_tables_while_their_sum_is_kept(tiny_llama):
    """Scoring keeps the items' output vectors between passes; whatever changes the tables (an in-place write
    as the refit's mix does, an optimizer step, a conversion, items added live), the next scores are those
    of the tables as they are then."""
    backbone, _ = load_backbone(str(tiny_llama))
    torch.manual_seed(0)
    model = CLLM4Rec(backbone, 4, 50, head_offsets=True)
    hidden = torch.randn(3, model.hidden_size)

    def scores() -> torch.Tensor:
        with torch.no_grad():
            return model.item_logits(hidden)

    def expected() -> torch.Tensor:
        items = model.collab_items.weight.detach().float() + model.head_offsets.detach().float()
        return model.logit_scale.detach() * (hidden @ model.head_projection.detach().T) @ items.T \
            + model.item_bias.detach().float()

    assert torch.allclose(scores(), expected())
    with torch.no_grad():
        model.head_offsets.add_(1.0)  # in place
    assert torch.allclose(scores(), expected())
    optimizer = torch.optim.SGD([model.collab_items.weight], lr=0.5)
    model.item_logits(hidden).sum().backward()  # with gradients: computed afresh, never the kept sum
    optimizer.step()
    assert torch.allclose(scores(), expected())
    model.collab_items.weight.data = model.collab_items.weight.data.to(torch.bfloat16)  # converted
    assert torch.allclose(scores(), expected())
    new = torch.randn(2, model.hidden_size)
    model.add_items(new, average_rows(model, model.n_items, new))  # replaced by larger tables
    assert scores().shape == (3, 52) and torch.allclose(scores(), expected())


# --- low-rank adapters on the backbone --------------------------------------------------------------

def test_adapters_start_as_the_frozen_backbone_and_train_only_their_low_rank_part(tiny_llama):
    from model.cllm4rec import collate_recommend
    from model.prompts import PromptTemplates, TokenSpace, build_recommend_prompt

    backbone, tokenizer = load_backbone(str(tiny_llama))
    torch.manual_seed(0)
    model = CLLM4Rec(backbone, 4, 6)
    space = TokenSpace(tokenizer, model.n_words, 4, 6, PromptTemplates())
    batch = collate_recommend([build_recommend_prompt(space, u, [u], 10) for u in range(4)],
                              [[u + 1] for u in range(4)], list(range(4)), [[u] for u in range(4)], 6)
    with torch.no_grad():
        before = model.prompt_item_logits(batch.input_ids, batch.attention_mask)
    frozen = {name: p.clone() for name, p in model.backbone.named_parameters()}
    model.attach_adapters(rank=2, n_layers=1)
    # Only the last block is adapted: its linear maps (attention and MLP) and nothing before it.
    assert model.adapters and all(name.startswith("1.") for name in model.adapters)
    with torch.no_grad():
        assert torch.equal(model.prompt_item_logits(batch.input_ids, batch.attention_mask), before)
    optimizer = torch.optim.Adam(model.head_parameters(bias=False), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model.recommend_nll(batch).backward()
        optimizer.step()
    with torch.no_grad():
        assert not torch.allclose(model.prompt_item_logits(batch.input_ids, batch.attention_mask), before)
    for name, p in model.backbone.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name  # the backbone's own weights never move


def test_trained_adapters_are_saved_and_served_with_the_same_scores(data, tiny_llama, tmp_path):
    from model.evaluate import cllm4rec_scorer

    out = tmp_path / "adapted"
    train(quick_config(data, out, tiny_llama, adapter_rank=2, adapter_layers=1))
    checkpoint = read_checkpoint(out)
    assert checkpoint.meta["adapters"] == {"rank": 2, "layers": 1, "targets": "all"}
    ups = [t for name, t in checkpoint.embeddings.items() if name.startswith("adapter.") and name.endswith(".up")]
    assert ups and any(float(t.abs().max()) > 0 for t in ups)  # trained away from the zero start
    recommender = load_recommender(out, "cpu")
    assert recommender.model.adapters
    split = recommender.checkpoint.split
    users = [u for u, items in enumerate(split.val) if len(items)][:4]
    with_adapters = cllm4rec_scorer(recommender.model, recommender.space, split, "val", recommender.max_history)(users)
    for adapter in recommender.model.adapters.values():
        adapter.up.data.zero_()
    without = cllm4rec_scorer(recommender.model, recommender.space, split, "val", recommender.max_history)(users)
    assert not torch.allclose(torch.as_tensor(with_adapters), torch.as_tensor(without))

