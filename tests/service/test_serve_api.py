"""The HTTP API over real HTTP, with the in-process history store: answers equal the offline
scorer's, seen items are excluded, online events count, business rules (excluded items, candidates),
cold start and fallback, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.settings import Settings
from serving_helpers import metric_value, offline_ranking, running_server, server_settings


MAX_K = Settings.model_fields["max_k"].default


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with running_server(server_settings(tiny_checkpoint)) as running:
        yield running


@pytest.fixture
def client(server):
    with server.client() as client:
        yield client


def ids_and_scores(response) -> tuple[list[str], list[float]]:
    items = response.json()["items"]
    return [it["item_id"] for it in items], [it["score"] for it in items]


def test_health_ready_and_metrics(client, offline):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    client.post("/recommend", json={"user_id": offline.checkpoint.user_ids[0]})
    text = client.get("/metrics").text
    for name in ("cllm4rec_http_request_duration_seconds", "cllm4rec_model_forward_duration_seconds",
                 "cllm4rec_batch_queue_wait_seconds", "cllm4rec_batch_size", "cllm4rec_requests_in_flight",
                 "cllm4rec_redis_operation_duration_seconds", "cllm4rec_errors_total", "cllm4rec_cold_start_total",
                 "cllm4rec_fallback_total", "cllm4rec_model_info"):
        assert f"# TYPE {name}" in text or f"# HELP {name}" in text, name
    assert metric_value(text, "cllm4rec_http_request_duration_seconds_count", endpoint="/recommend",
                        method="POST", status="200") >= 1
    assert metric_value(text, "cllm4rec_model_info", model_version=offline.checkpoint.model_version,
                        n_items=str(len(offline.checkpoint.item_ids))) == 1
    assert "u0" not in text  # no user ids in labels


@pytest.mark.parametrize("user", [0, 7, 42, 119])
def test_known_user_equals_offline_scorer_exactly(client, offline, user):
    """Alone in its batch, a request gets the very scores of score_prompts on the same prompt (bit for
    bit), its training items (the seeded history) excluded."""
    user_id = offline.checkpoint.user_ids[user]
    history = offline.checkpoint.split.train[user].tolist()
    response = client.post("/recommend", json={"user_id": user_id, "k": 10})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["cold_start"] is False and body["fallback"] is None and body["unknown_item_ids"] == []
    assert body["model_version"] == offline.checkpoint.model_version
    ids, scores = ids_and_scores(response)
    assert (ids, scores) == offline_ranking(offline, user, history, 10, history)
    seen = {offline.checkpoint.item_ids[i] for i in history}
    assert not seen & set(ids)
    titles = {it["item_id"]: it["title"] for it in body["items"]}
    assert all(titles[i] == offline.checkpoint.item_titles[offline.item_index[i]] for i in ids)


def test_get_and_batch_agree_with_post(client, offline):
    users = offline.checkpoint.user_ids[:5]
    posted = [ids_and_scores(client.post("/recommend", json={"user_id": u, "k": 7})) for u in users]
    got = [ids_and_scores(client.get(f"/recommend/{u}", params={"k": 7})) for u in users]
    assert got == posted
    passes_before = metric_value(client.get("/metrics").text, "cllm4rec_batch_size_count")
    batch = client.post("/recommend/batch", json={"requests": [{"user_id": u, "k": 7} for u in users]})
    assert batch.status_code == 200, batch.text
    # One pass for the request's users, none of them scored alone (CLLM4REC_LONE_PASS_ON_LOOP is for
    # requests with nothing to batch with).
    assert metric_value(client.get("/metrics").text, "cllm4rec_batch_size_count") == passes_before + 1
    results = batch.json()["results"]
    assert [r["user_id"] for r in results] == users
    for result, (ids, scores) in zip(results, posted):
        # Padded together in one forward pass: same ranking, scores within float32 rounding.
        assert [it["item_id"] for it in result["items"]] == ids
        np.testing.assert_allclose([it["score"] for it in result["items"]], scores, rtol=1e-5, atol=1e-5)


def test_exclude_seen_false_can_return_history_items(client, offline):
    user = 3
    history = offline.checkpoint.split.train[user].tolist()
    n_items = len(offline.checkpoint.item_ids)
    response = client.post("/recommend", json={"user_id": offline.checkpoint.user_ids[user], "k": n_items,
                                               "exclude_seen": False})
    assert ids_and_scores(response) == offline_ranking(offline, user, history, n_items, [])
    # and k larger than what is left after excluding the history returns what there is
    response = client.post("/recommend", json={"user_id": offline.checkpoint.user_ids[user], "k": MAX_K})
    assert len(response.json()["items"]) == n_items - len(history)


def test_posted_interaction_changes_next_result(client, offline):
    user = 11
    user_id = offline.checkpoint.user_ids[user]
    history = offline.checkpoint.split.train[user].tolist()
    before = client.post("/recommend", json={"user_id": user_id, "k": 5}).json()
    new_item = before["items"][0]["item_id"]
    added = client.post("/interactions", json={"user_id": user_id, "item_ids": [new_item, "no-such-item"]})
    assert added.status_code == 200, added.text
    assert added.json() == {"user_id": user_id, "history_length": len(history) + 2,
                            "unknown_item_ids": ["no-such-item"]}
    after = client.post("/recommend", json={"user_id": user_id, "k": 5})
    ids, scores = ids_and_scores(after)
    assert new_item not in ids  # now seen
    assert after.json()["unknown_item_ids"] == []  # ids of the stored history are never echoed
    grown = history + [offline.item_index[new_item]]
    assert (ids, scores) == offline_ranking(offline, user, grown, 5, grown)


def test_history_in_the_request_replaces_the_stored_one(client, offline):
    user = 5
    history = [offline.checkpoint.item_ids[i] for i in (1, 2, 3)]
    response = client.post("/recommend", json={"user_id": offline.checkpoint.user_ids[user], "k": 5,
                                               "history": history})
    assert ids_and_scores(response) == offline_ranking(offline, user, [1, 2, 3], 5, [1, 2, 3])


def test_unknown_user_with_history_gets_the_history_only_prompt(client, offline):
    metrics_before = client.get("/metrics").text
    history = ["i3", "unknown-a", "i9", "i3", "unknown-a", "unknown-b"]
    response = client.post("/recommend", json={"user_id": "visitor-1", "k": 6, "history": history})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["cold_start"] is True and body["fallback"] is None
    assert body["unknown_item_ids"] == ["unknown-a", "unknown-b"]
    # repeats dropped, the latest occurrence kept: i9 then i3
    prompt_items = [offline.item_index["i9"], offline.item_index["i3"]]
    assert ids_and_scores(response) == offline_ranking(offline, None, prompt_items, 6, prompt_items)
    metrics_after = client.get("/metrics").text
    assert metric_value(metrics_after, "cllm4rec_cold_start_total") == \
        metric_value(metrics_before, "cllm4rec_cold_start_total") + 1
    assert metric_value(metrics_after, "cllm4rec_fallback_total") == \
        metric_value(metrics_before, "cllm4rec_fallback_total")


def test_unknown_user_interactions_then_history_only_prompt(client, offline):
    first = client.post("/recommend", json={"user_id": "visitor-2", "k": 3}).json()
    assert first["fallback"] == "most_popular"
    client.post("/interactions", json={"user_id": "visitor-2", "item_ids": ["i4", "i5"]})
    second = client.post("/recommend", json={"user_id": "visitor-2", "k": 3})
    assert second.json()["cold_start"] is True and second.json()["fallback"] is None
    items = [offline.item_index["i4"], offline.item_index["i5"]]
    assert ids_and_scores(second) == offline_ranking(offline, None, items, 3, items)


def test_unknown_user_without_history_falls_back_to_most_popular(client, offline):
    metrics_before = client.get("/metrics").text
    for body in ({"user_id": "visitor-3", "k": 5}, {"user_id": "visitor-4", "k": 5, "history": ["nope"]}):
        response = client.post("/recommend", json=body)
        assert response.status_code == 200, response.text
        result = response.json()
        assert result["cold_start"] is True and result["fallback"] == "most_popular"
        popularity = torch.as_tensor(offline.popularity, dtype=torch.float32)
        expected = torch.argsort(popularity, descending=True, stable=True)[:5]  # ties: lower index first
        assert [it["score"] for it in result["items"]] == popularity[expected].tolist()
        assert [it["item_id"] for it in result["items"]] == \
            [offline.checkpoint.item_ids[i] for i in expected.tolist()]
    assert result["unknown_item_ids"] == ["nope"]
    metrics_after = client.get("/metrics").text
    assert metric_value(metrics_after, "cllm4rec_fallback_total") == \
        metric_value(metrics_before, "cllm4rec_fallback_total") + 2


@pytest.mark.parametrize("method, path, body", [
    ("post", "/recommend", {"k": 5}),
    ("post", "/recommend", {"user_id": "", "k": 5}),
    ("post", "/recommend", {"user_id": "u1", "k": 0}),
    ("post", "/recommend", {"user_id": "u1", "k": MAX_K + 1}),
    ("post", "/recommend", {"user_id": "u1", "k": "many"}),
    ("post", "/recommend", {"user_id": "u1", "history": "i1"}),
    ("post", "/recommend", {"user_id": "u1", "history": [""]}),
    ("post", "/recommend", {"user_id": "u1", "kk": 5}),
    ("post", "/recommend", {"user_id": "x" * 257}),
    ("post", "/recommend", "not json"),
    ("post", "/recommend/batch", {"requests": []}),
    ("post", "/recommend/batch", {"requests": [{"user_id": "u1", "k": -1}]}),
    ("post", "/interactions", {"user_id": "u1", "item_ids": []}),
    ("post", "/interactions", {"user_id": "u1"}),
    ("get", "/recommend/u1?k=0", None),
    ("get", "/recommend/u1?k=abc", None),
])
def test_invalid_input_is_a_422_with_a_message(client, method, path, body):
    errors_before = metric_value(client.get("/metrics").text, "cllm4rec_errors_total", kind="validation")
    if method == "get":
        response = client.get(path)
    elif isinstance(body, str):
        response = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = client.post(path, json=body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail and all(error["msg"] for error in detail)
    assert metric_value(client.get("/metrics").text, "cllm4rec_errors_total", kind="validation") == errors_before + 1


def test_openapi_schema_is_complete(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    expected = {("/healthz", "get"), ("/readyz", "get"), ("/metrics", "get"), ("/recommend", "post"),
                ("/recommend/{user_id}", "get"), ("/recommend/batch", "post"), ("/interactions", "post"),
                ("/admin/reload", "post"), ("/users/{user_id}/history", "get"),
                ("/users/{user_id}/history", "delete"), ("/items/{item_id}", "get"), ("/items/{item_id}", "patch"),
                ("/items/{item_id}", "delete"), ("/items/{item_id}/similar", "get"),
                ("/items", "post")}
    assert {(p, m) for p, ops in paths.items() for m in ops} == expected
    components = schema["components"]["schemas"]
    for name in ("RecommendRequest", "RecommendResponse", "BatchRecommendRequest", "InteractionsRequest",
                 "InteractionsResponse", "Readiness", "HistoryResponse", "ErasureResponse", "ItemResponse",
                 "ItemAvailability", "LiveItemRequest"):
        assert components[name].get("examples"), name
    assert {"401", "413", "422", "503", "504"} <= set(paths["/recommend"]["post"]["responses"])
    assert {"401", "413", "422", "503"} <= set(paths["/interactions"]["post"]["responses"])
    assert {"400", "401", "413", "422"} <= set(paths["/admin/reload"]["post"]["responses"])


def test_excluded_items_and_candidates_are_masks_on_the_one_pass(client, offline):
    user = 9
    user_id = offline.checkpoint.user_ids[user]
    item_ids = offline.checkpoint.item_ids
    history = offline.checkpoint.split.train[user].tolist()
    ranked, _ = offline_ranking(offline, user, history, len(item_ids) - len(history), history)
    excluded = ranked[:2]
    candidates = ranked[1:8] + [item_ids[history[0]], "not-an-item"]
    body = {"user_id": user_id, "k": 4, "exclude_item_ids": excluded, "candidate_item_ids": candidates}
    # the offline ranking restricted to the candidates, less the history and the excluded items
    expected = [i for i in ranked if i in candidates and i not in excluded][:4]
    for answer in (client.post("/recommend", json=body).json(),
                   client.post("/recommend/batch", json={"requests": [body, body]}).json()["results"][1]):
        assert [it["item_id"] for it in answer["items"]] == expected
        assert answer["unknown_item_ids"] == ["not-an-item"]  # sent in the request: it may come back
    # exclude_seen false: the candidate from the history may come back, the excluded items still not
    everything = client.post("/recommend", json={**body, "k": 20, "exclude_seen": False}).json()
    returned = [it["item_id"] for it in everything["items"]]
    assert item_ids[history[0]] in returned and not set(excluded) & set(returned)
    assert set(returned) <= set(candidates)

    # the popularity fallback obeys the same rules
    popular = [item_ids[i] for i in torch.argsort(torch.as_tensor(offline.popularity, dtype=torch.float32),
                                                   descending=True, stable=True).tolist()]
    cold = {"user_id": "rules-visitor", "k": 3, "exclude_item_ids": popular[:1], "candidate_item_ids": popular[:5]}
    answer = client.post("/recommend", json=cold).json()
    assert answer["fallback"] == "most_popular"
    assert [it["item_id"] for it in answer["items"]] == popular[1:4]


@pytest.mark.parametrize("field", ["exclude_item_ids", "candidate_item_ids"])
def test_rule_lists_have_a_limit(client, offline, field):
    limit = Settings.model_fields["max_rule_items"].default
    body = {"user_id": offline.checkpoint.user_ids[0], field: ["i1"] * (limit + 1)}
    response = client.post("/recommend", json=body)
    assert response.status_code == 422, response.text
    assert f"at most {limit} items" in response.text


def test_answers_encoded_from_fragments_are_the_response_models_json(tiny_checkpoint):
    """The bytes a recommendation answers with (fragments encoded once per item) parse to exactly what the
    RecommendResponse model serialises, for awkward ids and titles and a live item too."""
    import json

    from service.catalogue import LiveItem
    from service.served_model import Answer, ServedModel
    from service.schemas import RecommendedItem, RecommendResponse

    model = ServedModel.load(tiny_checkpoint, server_settings(tiny_checkpoint))
    model.add_live_items([LiveItem(item_id='live "ü"', title='a "quoted" title, ü\\n', description=None)])
    live = len(model.titles) - 1
    answer = Answer('user "ü"', [0, live, 2], [1.5, -0.25, 1e-5], cold_start=True, fallback="most_popular",
                    unknown_item_ids=['x"y'])
    ids = model.recommender.checkpoint.item_ids
    expected = RecommendResponse(
        user_id=answer.user_id, model_version=model.version, cold_start=True, fallback="most_popular",
        unknown_item_ids=['x"y'], items=[RecommendedItem(item_id=ids[i], score=s, title=model.titles[i])
                                         for i, s in zip(answer.items, answer.scores)])
    assert json.loads(model.response_json(answer)) == json.loads(expected.model_dump_json())
