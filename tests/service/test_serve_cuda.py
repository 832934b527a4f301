"""On a CUDA machine: the server puts the model on the GPU (float32 weights, bfloat16 compute) and
answers. Skipped where there is no CUDA device (CI)."""

import pytest
import torch

from serving_helpers import metric_value, running_server, server_settings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_server_scores_on_the_gpu(tiny_checkpoint, offline):
    with running_server(server_settings(tiny_checkpoint)) as server, server.client() as client:
        model = server.engine.model.recommender.model
        assert (model.collab_items.weight.device.type, model.collab_items.weight.dtype) == ("cuda", torch.float32)
        responses = [client.post("/recommend", json={"user_id": user_id, "k": 10})
                     for user_id in offline.checkpoint.user_ids[:20]]
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        for user, response in enumerate(responses):
            ids = [it["item_id"] for it in response.json()["items"]]
            seen = {offline.checkpoint.item_ids[i] for i in offline.checkpoint.split.train[user]}
            assert len(ids) == 10 and not seen & set(ids)
            scores = [it["score"] for it in response.json()["items"]]
            assert scores == sorted(scores, reverse=True) and all(abs(s) < 1e4 for s in scores)
        assert metric_value(client.get("/metrics").text, "cllm4rec_http_request_duration_seconds_count",
                            endpoint="/recommend", method="POST", status="200") == 20
