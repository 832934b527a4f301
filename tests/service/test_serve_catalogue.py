"""The live catalogue over HTTP with the real Redis: an item added from its text is placed where
training places items by their titles and served by every replica and a restarted server; a retired
item never comes back (single, batch, fallback, similar items), on every server sharing the Redis,
until it is restored; similar items are the offline scorer's answer to a one-item prompt; unknown
items are a 404, existing ones a 409; with a backbone whose words mean something, a new item lands with
the items it reads like."""

from __future__ import annotations

import pytest
import torch

from model.checkpoint import load_recommender
from model.initialise import text_vector
from serving_helpers import (REDIS_URL, metric_value, offline_ranking, running_server, server_settings,
                             variant_checkpoint)


def ids(answer: dict) -> list[str]:
    return [it["item_id"] for it in answer["items"]]


def test_a_retired_item_is_never_recommended_by_any_replica(tiny_checkpoint, offline, redis_prefix):
    settings = server_settings(tiny_checkpoint, redis_url=REDIS_URL, redis_key_prefix=redis_prefix)
    user = 3
    user_id = offline.checkpoint.user_ids[user]
    history = offline.checkpoint.split.train[user].tolist()
    top, _ = offline_ranking(offline, user, history, 5, history)
    popular = [offline.checkpoint.item_ids[i] for i in torch.argsort(
        torch.as_tensor(offline.popularity, dtype=torch.float32), descending=True, stable=True).tolist()]
    with running_server(settings) as one, running_server(settings) as other, \
            one.client() as a, other.client() as b:
        assert a.get(f"/items/{top[0]}").json() == {"item_id": top[0], "title": offline.checkpoint.item_titles[
            offline.item_index[top[0]]] or None, "source": "checkpoint", "available": True}
        retired = a.delete(f"/items/{top[0]}")
        assert retired.status_code == 200 and retired.json()["available"] is False
        assert a.patch(f"/items/{popular[0]}", json={"available": False}).json()["available"] is False

        gone = {top[0], popular[0]}
        ranked = offline_ranking(offline, user, history, 20, history)[0]
        for client in (a, b):  # the other replica too, from its next request on
            assert ids(client.post("/recommend", json={"user_id": user_id, "k": 5}).json()) == \
                [i for i in ranked if i not in gone][:5]
            batch = client.post("/recommend/batch", json={"requests": [{"user_id": user_id, "k": 20}] * 2}).json()
            assert all(top[0] not in ids(answer) for answer in batch["results"])
            fallback = client.post("/recommend", json={"user_id": "catalogue-visitor", "k": 3}).json()
            assert fallback["fallback"] == "most_popular" and ids(fallback) == [i for i in popular if i not in gone][:3]
            candidates = client.post("/recommend", json={"user_id": user_id, "candidate_item_ids": top[:2]}).json()
            assert ids(candidates) == top[1:2]
            assert client.get(f"/items/{top[0]}").json()["available"] is False
            similar = client.get(f"/items/{offline.checkpoint.item_ids[history[0]]}/similar", params={"k": 30})
            assert top[0] not in ids(similar.json())
        assert metric_value(b.get("/metrics").text, "cllm4rec_retired_items") == 2

        restored = b.patch(f"/items/{top[0]}", json={"available": True})
        assert restored.json()["available"] is True
        for client in (a, b):
            assert ids(client.post("/recommend", json={"user_id": user_id, "k": 5}).json()) == top


def test_unknown_items_are_a_404_and_nothing_is_stored(tiny_checkpoint, redis_prefix, redis_client):
    settings = server_settings(tiny_checkpoint, redis_url=REDIS_URL, redis_key_prefix=redis_prefix)
    with running_server(settings) as server, server.client() as client:
        for response in (client.get("/items/no-such-item"), client.delete("/items/no-such-item"),
                         client.patch("/items/no-such-item", json={"available": False})):
            assert response.status_code == 404 and "no-such-item" in response.json()["detail"]
        assert client.patch("/items/i1", json={"available": "maybe"}).status_code == 422
    assert not redis_client.exists(f"{redis_prefix}catalogue:retired")


def test_retiring_works_without_redis_too(tiny_checkpoint, offline):
    user_id = offline.checkpoint.user_ids[0]
    with running_server(server_settings(tiny_checkpoint)) as server, server.client() as client:
        first = ids(client.post("/recommend", json={"user_id": user_id, "k": 3}).json())[0]
        client.delete(f"/items/{first}")
        assert first not in ids(client.post("/recommend", json={"user_id": user_id, "k": 20}).json())


def test_similar_items_are_the_one_item_prompt_of_the_trainer(tiny_checkpoint, offline):
    item = 5
    item_id = offline.checkpoint.item_ids[item]
    with running_server(server_settings(tiny_checkpoint)) as server, server.client() as client:
        response = client.get(f"/items/{item_id}/similar", params={"k": 4})
        assert response.status_code == 200, response.text
        answer = response.json()
        expected_ids, expected_scores = offline_ranking(offline, None, [item], 4, [item])
        assert ids(answer) == expected_ids and [it["score"] for it in answer["items"]] == expected_scores
        assert item_id not in ids(answer) and answer["user_id"] == item_id
        assert client.get("/items/no-such-item/similar").status_code == 404
        assert client.get(f"/items/{item_id}/similar", params={"k": 0}).status_code == 422


def test_an_item_added_from_its_text_is_served_by_every_replica(tiny_checkpoint, offline, redis_prefix):
    settings = server_settings(tiny_checkpoint, redis_url=REDIS_URL, redis_key_prefix=redis_prefix)
    user_id = offline.checkpoint.user_ids[4]
    title = offline.checkpoint.item_titles[7] or "a travel tripod"
    words = offline.model.backbone.get_input_embeddings().weight.detach().float()
    with running_server(settings) as one, running_server(settings) as other, \
            one.client() as a, other.client() as b:
        added = a.post("/items", json={"item_id": "live-1", "title": title, "description": "folds small"})
        assert added.status_code == 201, added.text
        assert added.json() == {"item_id": "live-1", "title": title, "source": "live", "available": True}
        assert b.get("/items/live-1").json()["source"] == "live"  # the other replica, at its next request
        # its token is where training starts an item with that title (model.initialise.text_vector)
        table = one.engine.model.recommender.model.collab_items.weight
        assert torch.equal(table[-1].detach().float(), text_vector(words, offline.space.tokenizer, title))
        n_items = len(offline.checkpoint.item_ids) + 1
        for client in (a, b):
            only = client.post("/recommend", json={"user_id": user_id, "candidate_item_ids": ["live-1"]}).json()
            assert ids(only) == ["live-1"] and only["unknown_item_ids"] == []
            everything = client.post("/recommend", json={"user_id": user_id, "k": n_items}).json()
            assert "live-1" in ids(everything)
            similar = client.get("/items/live-1/similar", params={"k": 5})
            assert similar.status_code == 200 and "live-1" not in ids(similar.json())
        for duplicate in ("live-1", offline.checkpoint.item_ids[0]):
            response = b.post("/items", json={"item_id": duplicate, "title": "again"})
            assert response.status_code == 409 and "already" in response.json()["detail"]
        assert metric_value(a.get("/metrics").text, "cllm4rec_live_items") == 1

        assert b.delete("/items/live-1").json() == {"item_id": "live-1", "title": title, "source": "live",
                                                    "available": False}
        everything = a.post("/recommend", json={"user_id": user_id, "k": n_items}).json()
        assert "live-1" not in ids(everything)
        assert a.get("/items/live-1").json()["source"] == "live"  # a retirement re-reads the retired set only
        assert metric_value(a.get("/metrics").text, "cllm4rec_live_items") == 1
    # a restarted server finds it in Redis, live and retired: added to its model, and never recommended
    with running_server(settings) as server, server.client() as client:
        assert "live-1" not in ids(client.post("/recommend", json={"user_id": user_id, "k": n_items}).json())
        assert client.get("/items/live-1").json() == {"item_id": "live-1", "title": title, "source": "live",
                                                      "available": False}
        assert b"live-1" in server.engine.model.item_json[-1][0]


def test_items_can_be_added_without_redis(tiny_checkpoint, offline):
    with running_server(server_settings(tiny_checkpoint)) as server, server.client() as client:
        assert client.post("/items", json={"item_id": "live-2", "title": "blue mug"}).status_code == 201
        answer = client.post("/recommend", json={"user_id": offline.checkpoint.user_ids[0],
                                                 "candidate_item_ids": ["live-2"]}).json()
        assert ids(answer) == ["live-2"]
        assert client.post("/items", json={"item_id": "a/b", "title": "x"}).status_code == 422
        assert client.post("/items", json={"item_id": "live-3", "title": ""}).status_code == 422


def test_a_reloaded_model_gets_the_live_items_too(tiny_checkpoint, offline, tmp_path):
    new_version = variant_checkpoint(tiny_checkpoint, tmp_path / "new", scale=1.5)
    with running_server(server_settings(tiny_checkpoint, checkpoint_root=tmp_path)) as server, \
            server.client() as client:
        client.post("/items", json={"item_id": "live-4", "title": "red kettle"})
        assert client.post("/admin/reload", json={"checkpoint": str(tmp_path / "new")}).json()["model_version"] == \
            new_version
        answer = client.post("/recommend", json={"user_id": offline.checkpoint.user_ids[1],
                                                 "candidate_item_ids": ["live-4"]}).json()
        assert ids(answer) == ["live-4"] and answer["model_version"] == new_version
        assert client.get("/items/live-4").json()["source"] == "live"


READOUT_HEAD = {"head_refit": True, "head_readout": True, "distill_weight": 1.0}  # the cpu recipe's head


@pytest.mark.parametrize("head", ["offsets", "readout"])
def test_an_added_item_ranks_high_for_a_user_whose_history_is_about_the_same_thing(tmp_path_factory, monkeypatch,
                                                                                   head):
    """With the bundled SmolLM2 (cut to 2 layers, words that mean something) and a short training run on
    the synthetic shop, a head with its own rows as the recipes train it (the gpu recipe's offsets, the cpu
    recipe's refitted readout): for users who only ever bought coffee things, a new coffee product added by
    its title ranks above a new garden product, and near the top of what they are recommended. (Placed by
    the mean word embedding of its title alone, it ranked 93rd of 98 for every one of them.) The readout's
    text term is fitted when the model loads: adding items runs no calibration passes, which held every
    request of the replica for a second when they ran on the first live item."""
    from model.placement import TextReadout

    from model.backbone import DEFAULT_BACKBONE
    from model.config import TrainConfig
    from model.synthetic import CATEGORIES, write_synthetic_dataset
    from model.train import train

    data = write_synthetic_dataset(tmp_path_factory.mktemp("shop"), n_users=200, n_items=96, n_categories=8,
                                   min_items=5, max_items=10, seed=5, reviews=False)
    out = tmp_path_factory.mktemp("shop-model") / "ckpt"
    train(TrainConfig(data=str(data), out=str(out), backbone=DEFAULT_BACKBONE, backbone_layers=2, content=False,
                      content_epochs=0, pretrain_epochs=0, finetune_epochs=2, batch_size=32, val_users=0,
                      finetune_lr=1e-3, head_bias=True, head_offsets=True,
                      **(READOUT_HEAD if head == "readout" else {})))
    offline_model = load_recommender(out, "cpu")
    assert bool(offline_model.model.head_readout.any()) == (head == "readout")  # the refit wrote one
    coffee = set(CATEGORIES["coffee"])
    titles = offline_model.checkpoint.item_titles
    coffee_users = [offline_model.checkpoint.user_ids[u] for u, items in enumerate(offline_model.checkpoint.split.train)
                    if len(items) and all(any(noun in titles[i] for noun in coffee) for i in items)]
    assert coffee_users  # the synthetic shop has single-category users
    with running_server(server_settings(out)) as server, server.client() as client:
        monkeypatch.setattr(TextReadout, "fit", lambda *args, **kwargs: pytest.fail("a live item refitted the text"))
        for item_id, title in (("live-coffee", "barista espresso machine"), ("live-garden", "garden hose reel")):
            assert client.post("/items", json={"item_id": item_id, "title": title}).status_code == 201
        n_items = len(titles) + 2
        ranks = []
        for user_id in coffee_users:
            ranked = ids(client.post("/recommend", json={"user_id": user_id, "k": n_items}).json())
            ranks.append((ranked.index("live-coffee"), ranked.index("live-garden")))
    assert all(mine < other for mine, other in ranks), ranks
    assert sum(mine for mine, _ in ranks) / len(ranks) < 0.25 * n_items, ranks
