"""The item head's bias and scale: the server ranks with them exactly as evaluation does."""

from __future__ import annotations

import json
import shutil

import torch

from model.checkpoint import EMBEDDINGS_FILE, META_FILE, load_recommender, read_checkpoint, save_tensors, sha256_file
from model.evaluate import cllm4rec_scorer
from serving_helpers import running_server, server_settings


def test_server_and_evaluation_score_with_the_trained_bias_and_scale(tiny_checkpoint, tmp_path):
    target = tmp_path / "biased"
    shutil.copytree(tiny_checkpoint, target)
    tensors = read_checkpoint(tiny_checkpoint).embeddings
    favourite = 7
    tensors["item_bias"] = torch.zeros_like(tensors["item_bias"])
    tensors["item_bias"][favourite] = 1e3  # far above any dot product of the tiny model
    tensors["logit_scale"] = torch.tensor(0.5)
    save_tensors(target / EMBEDDINGS_FILE, tensors)
    meta = json.loads((target / META_FILE).read_text())
    meta["files"][EMBEDDINGS_FILE] = sha256_file(target / EMBEDDINGS_FILE)
    (target / META_FILE).write_text(json.dumps(meta))

    offline = load_recommender(target, "cpu")
    split = offline.checkpoint.split
    user = next(u for u, items in enumerate(split.train) if favourite not in items.tolist())
    evaluation = cllm4rec_scorer(offline.model, offline.space, split, "val", offline.max_history)([user])[0]
    assert int(evaluation.argmax()) == favourite
    plain = read_checkpoint(tiny_checkpoint)
    assert plain.embeddings["logit_scale"].item() != 0.5

    with running_server(server_settings(target)) as server, server.client() as client:
        response = client.post("/recommend", json={"user_id": offline.checkpoint.user_ids[user], "k": 5})
    assert response.status_code == 200, response.text
    items = response.json()["items"]
    assert items[0]["item_id"] == offline.checkpoint.item_ids[favourite]
    # The same computation: the served score of each item is evaluation's score of it.
    for item in items:
        index = offline.item_index[item["item_id"]]
        assert abs(item["score"] - float(evaluation[index])) <= 1e-4 * max(1.0, abs(item["score"]))
