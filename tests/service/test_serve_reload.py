"""Hot reload: POST /admin/reload under concurrent traffic fails no request and switches versions;
a batch spanning the swap never mixes models in a forward pass; the store is seeded for the new
checkpoint; a broken checkpoint is refused and the old model keeps serving; the old model is freed;
SIGHUP to `cllm4rec serve` reloads the configured checkpoint."""

from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import Counter

import httpx
import numpy as np

from model.checkpoint import EMBEDDINGS_FILE, load_recommender
from service.engine import Engine
from service.served_model import ServedModel
from serving_helpers import (REDIS_URL, free_port, metric_value, offline_ranking, running_server, server_settings,
                             slow_down, variant_checkpoint, wait_ready)


def version_served(client, user_id: str) -> str:
    response = client.post("/recommend", json={"user_id": user_id, "k": 5})
    assert response.status_code == 200, response.text
    return response.json()["model_version"]


def test_reload_under_traffic_fails_no_request_and_switches_versions(tiny_checkpoint, offline, tmp_path):
    old_version = offline.checkpoint.model_version
    new_version = variant_checkpoint(tiny_checkpoint, tmp_path / "new", scale=1.5)
    user_ids = offline.checkpoint.user_ids
    settings = server_settings(tiny_checkpoint, max_batch_size=4, max_wait_ms=5, checkpoint_root=tmp_path.parent)
    with running_server(settings) as server, server.client() as client:
        slow_down(server, 0.02)  # forward passes long enough that requests are in flight at each swap
        stop = threading.Event()
        answers: list[tuple[int, str | None]] = []

        def traffic(worker: int) -> None:
            with server.client() as own:
                i = worker
                while not stop.is_set():
                    response = own.post("/recommend", json={"user_id": user_ids[i % len(user_ids)], "k": 5})
                    answers.append((response.status_code, response.json().get("model_version")))
                    i += 7
        workers = [threading.Thread(target=traffic, args=(w,)) for w in range(6)]
        for worker in workers:
            worker.start()
        try:
            time.sleep(0.5)
            reloaded = client.post("/admin/reload", json={"checkpoint": str(tmp_path / "new")})
            assert reloaded.status_code == 200, reloaded.text
            assert reloaded.json()["model_version"] == new_version
            assert reloaded.json()["previous_model_version"] == old_version
            assert version_served(client, user_ids[3]) == new_version  # every request from now on
            assert metric_value(client.get("/metrics").text, "cllm4rec_model_info", model_version=new_version) == 1
            time.sleep(0.5)
            back = client.post("/admin/reload")  # no body: the configured checkpoint again
            assert back.status_code == 200 and back.json()["model_version"] == old_version, back.text
            assert version_served(client, user_ids[3]) == old_version
            time.sleep(0.5)
        finally:
            stop.set()
            for worker in workers:
                worker.join(30)
        assert metric_value(client.get("/metrics").text, "cllm4rec_reloads_total", result="ok") >= 2
    statuses = Counter(status for status, _ in answers)
    assert statuses == {200: len(answers)}, statuses
    versions = Counter(version for _, version in answers)
    assert versions[old_version] > 0 and versions[new_version] > 0, versions

    # The new model answers as the offline scorer does with that checkpoint.
    new = load_recommender(tmp_path / "new", "cpu")
    with running_server(server_settings(tiny_checkpoint, checkpoint_root=tmp_path)) as server, \
            server.client() as client:
        assert client.post("/admin/reload", json={"checkpoint": str(tmp_path / "new")}).status_code == 200
        history = new.checkpoint.split.train[3].tolist()
        response = client.post("/recommend", json={"user_id": user_ids[3], "k": 5}).json()
        assert [it["item_id"] for it in response["items"]] == offline_ranking(new, 3, history, 5, history)[0]


def test_a_batch_spanning_the_swap_is_scored_in_one_pass_per_model(tiny_checkpoint, tmp_path):
    variant_checkpoint(tiny_checkpoint, tmp_path / "new", scale=2.0)
    old = ServedModel.load(tiny_checkpoint, server_settings(tiny_checkpoint))
    new = ServedModel.load(tmp_path / "new", server_settings(tmp_path / "new"))
    jobs = [old.job(0, [1, 2], [1, 2], 5), new.job(0, [1, 2], [1, 2], 5), old.job(3, [4], [4], 5)]
    alone = [job.model.score([job])[0] for job in jobs]
    passes = []
    for model in (old, new):
        def score(batch, model=model, unwatched=model.score):
            passes.append((model, len(batch)))
            return unwatched(batch)
        model.score = score  # on this instance only
    rankings = Engine.score_batch(jobs)
    assert passes == [(old, 2), (new, 1)]
    for (items, scores), (items_alone, scores_alone) in zip(rankings, alone):
        assert items == items_alone  # padded with another prompt, scores may differ in the last float bits
        np.testing.assert_allclose(scores, scores_alone, rtol=1e-5, atol=1e-5)
    assert alone[0] != alone[1]  # the two models do differ on the same prompt


def test_reload_seeds_the_store_for_the_new_checkpoint(tiny_checkpoint, offline, tmp_path, redis_prefix,
                                                       redis_client):
    new_version = variant_checkpoint(tiny_checkpoint, tmp_path / "new", scale=1.5)
    settings = server_settings(tiny_checkpoint, redis_url=REDIS_URL, redis_key_prefix=redis_prefix,
                               checkpoint_root=tmp_path)
    user_id = offline.checkpoint.user_ids[2]
    key = f"{redis_prefix}history:{user_id}"
    with running_server(settings) as server, server.client() as client:
        assert redis_client.exists(redis_prefix + "seeded:" + offline.checkpoint.model_version)
        assert client.post("/interactions", json={"user_id": user_id, "item_ids": ["i9"]}).status_code == 200
        history = redis_client.lrange(key, 0, -1)
        assert client.post("/admin/reload", json={"checkpoint": str(tmp_path / "new")}).status_code == 200
        assert redis_client.exists(redis_prefix + "seeded:" + new_version)  # each version's own marker
        assert redis_client.exists(redis_prefix + "seeded:" + offline.checkpoint.model_version)
        assert redis_client.lrange(key, 0, -1) == history  # same training items: the online events kept


def test_a_broken_checkpoint_is_refused_and_the_old_model_keeps_serving(tiny_checkpoint, offline, tmp_path, caplog):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / EMBEDDINGS_FILE).write_bytes((broken / EMBEDDINGS_FILE).read_bytes()[:-64])
    version = offline.checkpoint.model_version
    user_id = offline.checkpoint.user_ids[5]
    with running_server(server_settings(tiny_checkpoint, checkpoint_root=tmp_path)) as server, \
            server.client() as client:
        before = client.post("/recommend", json={"user_id": user_id, "k": 5}).json()
        failed_before = metric_value(client.get("/metrics").text, "cllm4rec_reloads_total", result="failed")
        answers = {}
        # broken, missing, and outside the root (the configured checkpoint's own directory): one and the
        # same answer, so a caller cannot tell which paths exist; the log says why
        for path, reason in ((broken, "embeddings.safetensors does not match its checksum"),
                             (tmp_path / "missing", "no such checkpoint directory"),
                             (tiny_checkpoint, "not under the checkpoint root"),
                             (tmp_path / ".." / tiny_checkpoint.parent.name, "not under the checkpoint root")):
            response = client.post("/admin/reload", json={"checkpoint": str(path)})
            assert response.status_code == 400, response.text
            detail = response.json()["detail"]
            assert f"still serving {version}" in detail and reason not in detail
            answers[path] = detail.replace(str(path), "PATH")
            assert reason in caplog.text
        assert len(set(answers.values())) == 1, answers
        assert client.post("/recommend", json={"user_id": user_id, "k": 5}).json() == before
        text = client.get("/metrics").text
        assert metric_value(text, "cllm4rec_reloads_total", result="failed") == failed_before + 4
        assert metric_value(text, "cllm4rec_model_info", model_version=version) == 1
        assert client.get("/readyz").status_code == 200


def collector_scans(thing) -> bool:
    """Whether the cyclic garbage collector scans this object (service/heap.py freezes the long-lived ones)."""
    return any(tracked is thing for tracked in gc.get_objects())


def test_the_old_model_is_freed_after_the_swap(tiny_checkpoint, offline):
    """The served model is kept out of the garbage collector's scans (a full collection over it held every
    request for 200 ms), and still freed when a reload replaces it."""
    with running_server(server_settings(tiny_checkpoint)) as server, server.client() as client:
        old = weakref.ref(server.engine.model)
        old_network = weakref.ref(server.engine.model.recommender.model)
        assert not collector_scans(server.engine.model)
        assert client.post("/admin/reload").status_code == 200  # the same checkpoint, loaded anew
        assert server.engine.model is not old() and not collector_scans(server.engine.model)
        assert client.post("/recommend", json={"user_id": offline.checkpoint.user_ids[0]}).status_code == 200
        gc.collect()
        assert old() is None and old_network() is None


def test_sighup_reloads_the_configured_checkpoint(tiny_checkpoint, offline, tmp_path):
    """The configured path is a symlink an operator points elsewhere, then sends SIGHUP."""
    new_version = variant_checkpoint(tiny_checkpoint, tmp_path / "new", scale=0.5)
    served = tmp_path / "current"
    served.symlink_to(tiny_checkpoint)
    port = free_port()
    env = {**os.environ, "CLLM4REC_TORCH_THREADS": "1"}
    env.pop("CLLM4REC_REDIS_URL", None)
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--checkpoint", str(served),
                                    "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    user_id = offline.checkpoint.user_ids[1]

    def wait_for(condition, what: str) -> None:
        deadline = time.monotonic() + 60
        while not condition():
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, f"not {what} within 60 s:\n{log_path.read_text()}"
            time.sleep(0.2)
    try:
        wait_ready(url, process, 60)
        with httpx.Client(base_url=url, timeout=30) as client:
            assert version_served(client, user_id) == offline.checkpoint.model_version
            served.unlink()
            served.symlink_to(tmp_path / "new")
            process.send_signal(signal.SIGHUP)
            wait_for(lambda: version_served(client, user_id) == new_version, "reloaded")

            served.unlink()
            served.symlink_to(tmp_path / "missing")
            process.send_signal(signal.SIGHUP)
            wait_for(lambda: "SIGHUP: reload of" in log_path.read_text(), "refused")
            assert "no such checkpoint directory" in log_path.read_text()
            assert version_served(client, user_id) == new_version
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
