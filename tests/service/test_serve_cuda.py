"""On a CUDA machine: the server puts the model on the GPU (float32 weights, bfloat16 compute), chooses
between eager passes and CUDA graphs, and answers. Skipped where there is no CUDA device (CI)."""

import pytest
import torch

from model.cllm4rec import score_prompts
from model.prompts import build_recommend_prompt
from service.precision import parse_backbone_format
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


def test_the_backbone_format_is_chosen_on_the_gpu(tiny_checkpoint, offline):
    """CLLM4REC_DTYPE=auto on CUDA times the eager passes against their CUDA graphs and keeps what agrees;
    either way the answers rank as the offline model on the CPU does, bfloat16's rounding aside."""
    with running_server(server_settings(tiny_checkpoint, dtype="auto")) as server, server.client() as client:
        precision = client.get("/readyz").json()["precision"]
        # one of them, or each for the batch sizes it measured faster at ("float32-cuda-graphs+float32@N")
        small, large, _ = parse_backbone_format(precision)
        assert {small, large} - {None} <= {"float32", "float32-cuda-graphs"}, server.engine.model.precision.reason
        answers = [client.post("/recommend", json={"user_id": user_id, "k": 20}).json()
                   for user_id in offline.checkpoint.user_ids[:8]]
    served = [[item["item_id"] for item in answer["items"]] for answer in answers]
    shared = 0
    for user, items in enumerate(served):
        history = offline.checkpoint.split.train[user].tolist()
        scores = score_prompts(offline.model, [build_recommend_prompt(offline.space, user, history,
                                                                      offline.max_history)])[0]
        scores[history] = -torch.inf
        expected = {offline.checkpoint.item_ids[i] for i in torch.topk(scores, 20).indices.tolist()}
        shared += len(expected & set(items))
    assert shared / (20 * len(served)) >= 0.75
