"""Histories in the real Redis: seeding (server start and `cllm4rec load-histories`: merged, once per
model version, idempotent), the key layout and cap, online updates, reading and erasing a history,
the TTL, and a Redis that stops, hangs and comes back (the replica stays ready)."""

from __future__ import annotations

import logging
import os
import signal
import time

import redis

from serving_helpers import (REDIS_URL, metric_value, offline_ranking, running_server, server_settings,
                             variant_checkpoint)
from service.cli import main


def history_key(prefix: str, user_id: str) -> str:
    return f"{prefix}history:{user_id}"


def test_server_seeds_redis_and_serves_online_updates(tiny_checkpoint, offline, redis_prefix, redis_client):
    cap = 6
    settings = server_settings(tiny_checkpoint, redis_url=REDIS_URL, redis_key_prefix=redis_prefix,
                               history_max_length=cap)
    item_ids, user_ids = offline.checkpoint.item_ids, offline.checkpoint.user_ids
    user = next(u for u, items in enumerate(offline.checkpoint.split.train) if len(items) > cap)
    user_id = user_ids[user]
    train = offline.checkpoint.split.train[user].tolist()
    with running_server(settings) as server, server.client() as client:
        assert client.get("/readyz").status_code == 200
        assert redis_client.get(redis_prefix + "seeded:" + offline.checkpoint.model_version) == "1"
        # one key per user, the most recent `cap` items, oldest first
        assert redis_client.lrange(history_key(redis_prefix, user_id), 0, -1) == [item_ids[i] for i in train[-cap:]]
        assert len(list(redis_client.scan_iter(match=history_key(redis_prefix, "*")))) == \
            sum(1 for items in offline.checkpoint.split.train if len(items))

        response = client.post("/recommend", json={"user_id": user_id, "k": 5})
        ids = [it["item_id"] for it in response.json()["items"]]
        assert (ids, [it["score"] for it in response.json()["items"]]) == \
            offline_ranking(offline, user, train[-cap:], 5, train[-cap:])

        added = client.post("/interactions", json={"user_id": user_id, "item_ids": ids[:2]})
        assert added.json()["history_length"] == cap
        stored = redis_client.lrange(history_key(redis_prefix, user_id), 0, -1)
        assert stored == [item_ids[i] for i in train[-cap + 2:]] + ids[:2]
        after = client.post("/recommend", json={"user_id": user_id, "k": 5}).json()
        now = [offline.item_index[i] for i in stored]
        assert [it["item_id"] for it in after["items"]] == offline_ranking(offline, user, now, 5, now)[0]

        before = client.get("/metrics").text
        client.post("/recommend", json={"user_id": user_id})
        after_metrics = client.get("/metrics").text
        # One round trip a recommendation: the history and the catalogue's version in one pipeline.
        for operation, calls in (("get", 1), ("catalogue", 0)):
            assert metric_value(after_metrics, "cllm4rec_redis_operation_duration_seconds_count",
                                operation=operation) == \
                metric_value(before, "cllm4rec_redis_operation_duration_seconds_count", operation=operation) + calls

    # A restarted server finds the store seeded by its checkpoint and keeps the online events.
    with running_server(settings) as server, server.client() as client:
        assert redis_client.lrange(history_key(redis_prefix, user_id), 0, -1) == stored
        again = client.post("/recommend", json={"user_id": user_id, "k": 5}).json()
        assert again["items"] == after["items"]


def test_load_histories_is_idempotent(tiny_checkpoint, offline, redis_prefix, redis_client, monkeypatch, capsys):
    monkeypatch.setenv("CLLM4REC_REDIS_KEY_PREFIX", redis_prefix)
    command = ["load-histories", "--checkpoint", str(tiny_checkpoint), "--redis-url", REDIS_URL]
    assert main(command) == 0
    n_users = sum(1 for items in offline.checkpoint.split.train if len(items))
    assert capsys.readouterr().out.startswith(f"{n_users} of ")
    user_id = offline.checkpoint.user_ids[0]
    key = history_key(redis_prefix, user_id)
    seeded = redis_client.lrange(key, 0, -1)
    redis_client.rpush(key, "i1")  # an online event
    assert main(command) == 0
    assert capsys.readouterr().out.startswith("0 of ")
    assert redis_client.lrange(key, 0, -1) == seeded + ["i1"]
    assert redis_client.get(redis_prefix + "seeded:" + offline.checkpoint.model_version) == "1"


def test_load_histories_needs_redis(tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.delenv("CLLM4REC_REDIS_URL", raising=False)
    assert main(["load-histories", "--checkpoint", str(tiny_checkpoint)]) == 2
    assert "--redis-url" in capsys.readouterr().err


def wait_for(predicate, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_redis_outage_gives_503_and_recovers(tiny_checkpoint, offline, own_redis):
    settings = server_settings(tiny_checkpoint, redis_url=own_redis.url, redis_timeout_s=0.3,
                               seed_check_interval_s=0.2)
    user = 2
    user_id = offline.checkpoint.user_ids[user]
    train = offline.checkpoint.split.train[user].tolist()
    expected = offline_ranking(offline, user, train, 5, train)[0]
    needs_store = [("post", "/recommend", {"user_id": user_id}), ("get", f"/recommend/{user_id}", None),
                   ("post", "/recommend/batch", {"requests": [{"user_id": user_id}]}),
                   ("post", "/interactions", {"user_id": user_id, "item_ids": ["i1"]})]

    def ids(client) -> list[str]:
        return [it["item_id"] for it in client.post("/recommend", json={"user_id": user_id, "k": 5}).json()["items"]]

    def assert_unavailable(client, max_seconds: float):
        # still ready: the replica answers requests that bring their history, and the fallback
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["history_store"] is False, ready.text
        assert "Redis" in ready.json()["detail"]
        assert metric_value(client.get("/metrics").text, "cllm4rec_history_store_up") == 0
        for method, path, body in needs_store:
            started = time.monotonic()
            response = client.request(method, path, json=body)
            assert response.status_code == 503, (path, response.text)
            assert "Redis" in response.json()["detail"] and response.headers["retry-after"] == "1"
            assert time.monotonic() - started < max_seconds  # fails fast, never hangs
        assert client.get("/healthz").status_code == 200  # liveness does not depend on Redis
        # a request that brings its own history needs no store
        own = client.post("/recommend", json={"user_id": user_id, "k": 5,
                                              "history": [offline.checkpoint.item_ids[i] for i in train]})
        assert own.status_code == 200 and [it["item_id"] for it in own.json()["items"]] == expected

    with running_server(settings) as server, server.client() as client:
        assert client.get("/readyz").status_code == 200
        assert ids(client) == expected
        errors_before = metric_value(client.get("/metrics").text, "cllm4rec_errors_total", kind="history_store")

        own_redis.stop()  # down: connections refused
        assert_unavailable(client, max_seconds=1.0)
        errors = metric_value(client.get("/metrics").text, "cllm4rec_errors_total", kind="history_store")
        assert errors == errors_before + len(needs_store)

        own_redis.start()  # back, but empty (no persistence): the server seeds it again
        wait_for(lambda: client.get("/readyz").json()["history_store"])
        wait_for(lambda: ids(client) == expected)

        os.kill(own_redis.process.pid, signal.SIGSTOP)  # up but not answering: the timeouts end it
        try:
            assert_unavailable(client, max_seconds=2.0)
        finally:
            os.kill(own_redis.process.pid, signal.SIGCONT)
        wait_for(lambda: client.get("/readyz").json()["history_store"])
        assert ids(client) == expected


def test_server_starts_without_redis_and_seeds_when_it_comes(tiny_checkpoint, offline, own_redis):
    own_redis.stop()
    settings = server_settings(tiny_checkpoint, redis_url=own_redis.url, redis_timeout_s=0.3,
                               seed_check_interval_s=0.2)
    user = 4
    train = [offline.checkpoint.item_ids[i] for i in offline.checkpoint.split.train[user].tolist()]
    with running_server(settings) as server, server.client() as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["history_store"] is False, ready.text
        own_redis.start()
        wait_for(lambda: client.get("/readyz").json()["history_store"])
        store = redis.Redis(port=own_redis.port, decode_responses=True)
        wait_for(lambda: store.lrange(history_key(settings.redis_key_prefix, offline.checkpoint.user_ids[user]),
                                      0, -1) == train)
        store.close()


def test_events_that_arrive_before_the_seed_come_after_the_training_items(tiny_checkpoint, offline, own_redis):
    """Redis is down at start; it comes back and events arrive before the server's next seeding
    check: seeding merges, so each history is the training items, then the events, in order."""
    own_redis.stop()
    settings = server_settings(tiny_checkpoint, redis_url=own_redis.url, redis_timeout_s=0.3,
                               seed_check_interval_s=1.5)
    users = [1, 2, 3]
    item_ids, user_ids = offline.checkpoint.item_ids, offline.checkpoint.user_ids
    events = {user: [f"new-{user}-a", item_ids[0], f"new-{user}-b"] for user in users}
    with running_server(settings) as server, server.client() as client:
        own_redis.start()
        store = redis.Redis(port=own_redis.port, decode_responses=True)
        marker = settings.redis_key_prefix + "seeded:" + offline.checkpoint.model_version
        for user in users:
            response = client.post("/interactions", json={"user_id": user_ids[user], "item_ids": events[user]})
            assert response.status_code == 200, response.text
        assert not store.exists(marker), "seeding ran before the events: the test proves nothing"
        wait_for(lambda: store.exists(marker))
        for user in users:
            train = [item_ids[i] for i in offline.checkpoint.split.train[user].tolist()]
            merged = train + [item for item in events[user] if item not in train]
            stored = client.get(f"/users/{user_ids[user]}/history").json()["item_ids"]
            assert stored == merged == store.lrange(history_key(settings.redis_key_prefix, user_ids[user]), 0, -1)
        store.close()


def test_two_versions_live_seed_once_each(tiny_checkpoint, offline, tmp_path, redis_prefix, redis_client, caplog):
    """A rolling update or a canary: two model versions on one Redis, each checking every 0.1 s."""
    caplog.set_level(logging.INFO)
    variant = tmp_path / "variant"
    new_version = variant_checkpoint(tiny_checkpoint, variant, scale=1.5)
    common = dict(redis_url=REDIS_URL, redis_key_prefix=redis_prefix, seed_check_interval_s=0.1)
    with running_server(server_settings(tiny_checkpoint, **common)), \
            running_server(server_settings(variant, **common)):
        wait_for(lambda: redis_client.exists(redis_prefix + "seeded:" + new_version))
        time.sleep(1.0)  # ten checks of each
    seeded = [r.getMessage() for r in caplog.records if r.getMessage().startswith("history store seeded")]
    assert len(seeded) == 2, seeded
    assert redis_client.exists(redis_prefix + "seeded:" + offline.checkpoint.model_version)


def test_history_can_be_read_and_erased_for_good(tiny_checkpoint, offline, redis_prefix, redis_client, monkeypatch):
    settings = server_settings(tiny_checkpoint, redis_url=REDIS_URL, redis_key_prefix=redis_prefix)
    user = 6
    user_id = offline.checkpoint.user_ids[user]
    train = [offline.checkpoint.item_ids[i] for i in offline.checkpoint.split.train[user].tolist()]
    key = history_key(redis_prefix, user_id)
    with running_server(settings) as server, server.client() as client:
        client.post("/interactions", json={"user_id": user_id, "item_ids": ["i1", "unknown-to-the-model"]})
        assert client.get(f"/users/{user_id}/history").json() == {
            "user_id": user_id, "item_ids": train + ["i1", "unknown-to-the-model"]}

        erased = client.delete(f"/users/{user_id}/history")
        assert erased.status_code == 200 and erased.json() == {"user_id": user_id, "erased": True}
        assert not redis_client.exists(key)
        assert client.get(f"/users/{user_id}/history").json()["item_ids"] == []
        assert client.delete(f"/users/{user_id}/history").json()["erased"] is False
        # the next recommendation has no stored history to prompt with or to exclude
        response = client.post("/recommend", json={"user_id": user_id, "k": 5}).json()
        assert [it["item_id"] for it in response["items"]] == offline_ranking(offline, user, [], 5, [])[0]

    # Seeding again (a restarted Redis that lost its marker, another version) never writes it back.
    redis_client.delete(redis_prefix + "seeded:" + offline.checkpoint.model_version)
    monkeypatch.setenv("CLLM4REC_REDIS_KEY_PREFIX", redis_prefix)
    assert main(["load-histories", "--checkpoint", str(tiny_checkpoint), "--redis-url", REDIS_URL]) == 0
    assert not redis_client.exists(key)
    with running_server(settings) as server, server.client() as client:
        client.post("/interactions", json={"user_id": user_id, "item_ids": ["i2"]})  # a new history starts
        assert client.get(f"/users/{user_id}/history").json()["item_ids"] == ["i2"]


def test_history_keys_expire_after_the_ttl_from_their_last_write(tiny_checkpoint, offline, redis_prefix,
                                                                redis_client):
    settings = server_settings(tiny_checkpoint, redis_url=REDIS_URL, redis_key_prefix=redis_prefix,
                               history_ttl_s=1000)
    seeded_key = history_key(redis_prefix, offline.checkpoint.user_ids[0])
    with running_server(settings) as server, server.client() as client:
        assert 990 < redis_client.ttl(seeded_key) <= 1000  # seeded keys expire too
        client.post("/interactions", json={"user_id": "visitor-ttl", "item_ids": ["i1"]})
        key = history_key(redis_prefix, "visitor-ttl")
        redis_client.expire(key, 5)
        client.post("/interactions", json={"user_id": "visitor-ttl", "item_ids": ["i2"]})
        assert redis_client.ttl(key) > 990  # refreshed by the write
    with running_server(server_settings(tiny_checkpoint, redis_url=REDIS_URL, redis_key_prefix=redis_prefix)) \
            as server, server.client() as client:
        client.post("/interactions", json={"user_id": "visitor-no-ttl", "item_ids": ["i1"]})
        assert redis_client.ttl(history_key(redis_prefix, "visitor-no-ttl")) == -1  # the default: no expiry
