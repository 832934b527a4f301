"""Micro-batching under concurrency (each caller gets its own answer), the bounded queue (503 with
Retry-After), request timeouts (504) and the SIGTERM drain, over real HTTP to uvicorn."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import httpx
import numpy as np
import pytest

from serving_helpers import metric_value, offline_ranking, running_server, server_settings, slow_down, start_server
from service.app import begin_shutdown
from service.cli import Server


async def post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        return await asyncio.gather(*(client.post("/recommend", json=body) for body in bodies))


def batch_sizes(text: str) -> tuple[float, float]:
    """(forward passes, forward passes of a single request) so far."""
    return (metric_value(text, "cllm4rec_batch_size_count"),
            metric_value(text, "cllm4rec_batch_size_bucket", le="1.0"))


def test_concurrent_requests_share_forward_passes_and_get_their_own_answers(tiny_checkpoint, offline):
    settings = server_settings(tiny_checkpoint, max_batch_size=16, max_wait_ms=50)
    users = list(range(0, 120, 4))  # 30 users, histories of different lengths: padded batches
    with running_server(settings) as server, server.client() as client:
        passes_before, singles_before = batch_sizes(client.get("/metrics").text)
        responses = asyncio.run(post_all(server.url, [{"user_id": offline.checkpoint.user_ids[u], "k": 8}
                                                      for u in users]))
        passes_after, singles_after = batch_sizes(client.get("/metrics").text)
    assert passes_after - passes_before < len(users)  # fewer forward passes than requests
    assert (passes_after - passes_before) > (singles_after - singles_before)  # some batch had > 1 request
    for user, response in zip(users, responses):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["user_id"] == offline.checkpoint.user_ids[user]
        history = offline.checkpoint.split.train[user].tolist()
        ids, scores = offline_ranking(offline, user, history, 8, history)
        # Padded with others, a prompt's scores may differ from its lone forward pass in the last
        # bits of float32 (other matmul shapes); the ranking is the same.
        assert [it["item_id"] for it in body["items"]] == ids
        np.testing.assert_allclose([it["score"] for it in body["items"]], scores, rtol=1e-5, atol=1e-5)


def test_full_queue_answers_503_with_retry_after(tiny_checkpoint, offline):
    settings = server_settings(tiny_checkpoint, max_batch_size=1, queue_size=2)
    with running_server(settings) as server, server.client() as client:
        slow_down(server, 0.3)
        errors_before = metric_value(client.get("/metrics").text, "cllm4rec_errors_total", kind="overloaded")
        user_ids = offline.checkpoint.user_ids[:8]
        responses = asyncio.run(post_all(server.url, [{"user_id": u, "k": 3} for u in user_ids]))
        statuses = [r.status_code for r in responses]
        assert set(statuses) == {200, 503}, statuses
        rejected = [r for r in responses if r.status_code == 503]
        assert all(r.headers["retry-after"] == "1" and "waiting" in r.json()["detail"] for r in rejected)
        errors = metric_value(client.get("/metrics").text, "cllm4rec_errors_total", kind="overloaded")
        assert errors == errors_before + len(rejected)
        for user_id, response in zip(user_ids, responses):  # the admitted ones are answered correctly
            if response.status_code == 200:
                user = offline.user_index[user_id]
                history = offline.checkpoint.split.train[user].tolist()
                assert [it["item_id"] for it in response.json()["items"]] == \
                    offline_ranking(offline, user, history, 3, history)[0]


def test_slow_request_times_out_with_504_and_the_server_goes_on(tiny_checkpoint, offline):
    # The worker thread's pass: a lone request's pass on the event loop answers when it is done.
    settings = server_settings(tiny_checkpoint, request_timeout_s=0.2, lone_pass_on_loop=False)
    with running_server(settings) as server, server.client() as client:
        errors_before = metric_value(client.get("/metrics").text, "cllm4rec_errors_total", kind="timeout")
        slow_down(server, 1.0)
        started = time.monotonic()
        response = client.post("/recommend", json={"user_id": offline.checkpoint.user_ids[1]})
        assert response.status_code == 504 and "CLLM4REC_REQUEST_TIMEOUT_S" in response.json()["detail"]
        assert time.monotonic() - started < 0.8  # the deadline, not the forward pass, ended it
        assert metric_value(client.get("/metrics").text, "cllm4rec_errors_total", kind="timeout") == errors_before + 1
        server.engine.batcher.run_batch = server.engine.score_batch
        time.sleep(1.0)  # the abandoned forward pass finishes (a forward pass cannot be interrupted)
        assert client.post("/recommend", json={"user_id": offline.checkpoint.user_ids[1]}).status_code == 200


def test_readyz_fails_as_soon_as_shutdown_begins(tiny_checkpoint):
    with running_server(server_settings(tiny_checkpoint)) as server, server.client() as client:
        assert client.get("/readyz").status_code == 200
        begin_shutdown(server.app)
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["shutting_down"] is True
        assert client.get("/healthz").status_code == 200


@pytest.mark.timeout(60)
def test_sigterm_drains_in_flight_requests(tiny_checkpoint, offline):
    server = start_server(server_settings(tiny_checkpoint), server_class=Server)
    slow_down(server, 1.0)
    results = []
    request = threading.Thread(target=lambda: results.append(
        httpx.post(server.url + "/recommend", json={"user_id": offline.checkpoint.user_ids[0]}, timeout=30)))
    request.start()
    time.sleep(0.3)  # the request is in its forward pass
    server.server.handle_exit(signal.SIGTERM, None)  # what uvicorn calls on SIGTERM
    assert server.app.state.shutting_down  # /readyz fails from now on
    request.join(30)
    server.thread.join(30)
    assert not server.thread.is_alive()
    assert results and results[0].status_code == 200  # finished, not cut off
    with pytest.raises(httpx.ConnectError):  # and nothing new is accepted
        httpx.get(server.url + "/healthz")


def test_a_lone_request_runs_at_once_and_a_batch_waits_only_for_requests_on_their_way():
    """max_wait is how long a batch may wait for company, spent only while other requests are on their way
    (reading their histories): a lone request is scored at once, even with a minute of max_wait."""
    from service.batcher import Batcher

    async def scenario() -> list[list[str]]:
        batches: list[list[str]] = []
        batcher = Batcher(lambda jobs: batches.append(list(jobs)) or list(jobs), max_batch_size=8, max_wait_s=60,
                          queue_size=8)
        batcher.start()
        assert await asyncio.wait_for(batcher.submit("alone"), 10) == "alone"
        with batcher.arriving():
            first = asyncio.create_task(batcher.submit("first"))
            await asyncio.sleep(0.05)  # the batch holds "first" and waits for the request on its way
        second = asyncio.create_task(batcher.submit("second"))
        assert await asyncio.wait_for(asyncio.gather(first, second), 10) == ["first", "second"]
        await batcher.stop()
        return batches

    assert asyncio.run(scenario()) == [["alone"], ["first", "second"]]


@pytest.mark.parametrize("lone_on_loop", [True, False])
def test_a_lone_request_is_scored_on_the_event_loop_and_company_in_the_worker_thread(lone_on_loop):
    """With lone_on_loop, a request with nothing to batch with skips the hop to the worker thread; requests
    that find others waiting or on their way are still batched there, and a lone failure is its own."""
    from service.batcher import Batcher

    async def scenario() -> list[tuple[list[str], str]]:
        batches: list[tuple[list[str], str]] = []

        def run_batch(jobs):
            if "fail" in jobs:
                raise ValueError("this pass failed")
            batches.append((list(jobs), threading.current_thread().name))
            return [job.upper() for job in jobs]

        batcher = Batcher(run_batch, max_batch_size=8, max_wait_s=60, queue_size=8, lone_on_loop=lone_on_loop)
        batcher.start()
        assert await asyncio.wait_for(batcher.submit("alone"), 10) == "ALONE"
        with batcher.arriving():
            first = asyncio.create_task(batcher.submit("first"))
            await asyncio.sleep(0.05)  # "first" has company on its way: the worker holds it
        second = asyncio.create_task(batcher.submit("second"))
        assert await asyncio.wait_for(asyncio.gather(first, second), 10) == ["FIRST", "SECOND"]
        with pytest.raises(ValueError, match="this pass failed"):
            await asyncio.wait_for(batcher.submit("fail"), 10)
        assert await asyncio.wait_for(batcher.submit("after"), 10) == "AFTER"
        await batcher.stop()
        return batches

    loop_thread = threading.current_thread().name  # asyncio.run's loop runs on this thread
    batches = asyncio.run(scenario())
    assert [jobs for jobs, _ in batches] == [["alone"], ["first", "second"], ["after"]]
    lone_thread = loop_thread if lone_on_loop else batches[1][1]
    assert [thread for _, thread in batches] == [lone_thread, batches[1][1], lone_thread]
    assert batches[1][1] != loop_thread  # company is always batched in the worker thread
