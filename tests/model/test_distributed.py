"""Data-parallel training under torchrun, as a user runs it: two gloo processes on the CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.checkpoint import EMBEDDINGS_FILE, METRICS_FILE, load_recommender, read_checkpoint
from model.evaluate import evaluate_cllm4rec, evaluation_users
from model.train import STATE_DIR

BIN = Path(sys.executable).parent


def run_train(data, out, backbone, *options, ranks: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    """`cllm4rec train` with a quick finetuning-only setup, under torchrun when ranks > 1."""
    command = [str(BIN / "cllm4rec"), "train", "--data", str(data), "--out", str(out), "--backbone", str(backbone),
               "--content-epochs", "0", "--pretrain-epochs", "0", "--finetune-lr", "1e-2", "--val-users", "0",
               "--no-finetune-content", "--max-text-tokens", "16", *options]
    if ranks > 1:
        command = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(ranks), *command]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def tables(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / STATE_DIR / EMBEDDINGS_FILE)


def test_two_ranks_of_batch_b_take_the_steps_of_one_process_of_batch_2b(synthetic_data, tiny_llama, tmp_path):
    # One epoch of finetuning: about eight steps of 16 + 16 examples against eight of 32, with the same
    # masks and targets (every rank draws the same epoch) and the same starting tokens.
    one = run_train(synthetic_data, tmp_path / "one", tiny_llama, "--finetune-epochs", "1", "--batch-size", "32")
    two = run_train(synthetic_data, tmp_path / "two", tiny_llama, "--finetune-epochs", "1", "--batch-size", "16",
                    ranks=2)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert "data parallel: 2 ranks (gloo)" in two.stdout
    assert two.stdout.count("epoch 1/1") == 1  # rank 0 alone reports
    single, parallel = tables(tmp_path / "one"), tables(tmp_path / "two")
    assert set(single) == set(parallel)
    for name in single:
        # The same steps up to float rounding: a rank pads its share to its own longest prompt and sums
        # in another order, and Adam's normalised step magnifies rounding where a gradient is near
        # zero. A wrong share, count or reduction would move rows by about a step (lr 1e-2).
        difference = (parallel[name] - single[name]).abs().reshape(len(single[name]), -1).amax(1) \
            if single[name].dim() else (parallel[name] - single[name]).abs()[None]
        assert float(difference.max()) < 1e-3, name  # a tenth of a step
        assert float((difference < 1e-5).float().mean()) > 0.95, name  # nearly all rows to rounding
    # Both views start equal and the content view is not trained here: training moved the collaborative one.
    assert float((single["collab_items"] - single["content_items"]).abs().max()) > 1e-3


def test_a_two_rank_run_resumes_and_evaluates_like_the_single_process_run(synthetic_data, tiny_llama, tmp_path):
    one = run_train(synthetic_data, tmp_path / "one", tiny_llama, "--finetune-epochs", "3", "--batch-size", "32")
    assert one.returncode == 0, one.stderr[-3000:]
    first = run_train(synthetic_data, tmp_path / "two", tiny_llama, "--finetune-epochs", "2", "--batch-size", "16",
                      ranks=2)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_train(synthetic_data, tmp_path / "two", tiny_llama, "--finetune-epochs", "3", "--batch-size", "16",
                        "--resume", ranks=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after epoch 2" in resumed.stdout
    records = [json.loads(line) for line in (tmp_path / "two" / METRICS_FILE).read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]  # one line per epoch: rank 0 alone writes

    results = {}
    for name in ("one", "two"):
        recommender = load_recommender(tmp_path / name, "cpu")
        split = recommender.checkpoint.split
        results[name] = evaluate_cllm4rec(recommender.model, recommender.space, split, "val",
                                          evaluation_users(split, "val"), recommender.max_history, 64)
        assert read_checkpoint(tmp_path / name).meta["metrics"]["val"] == pytest.approx(results[name], abs=1e-6)
    # Three epochs of the same steps, up to rounding (the test above): rankings of 48 items agree but for
    # near-ties, so the metrics of the 120 users agree to within a tie's effect.
    for metric, value in results["one"].items():
        assert results["two"][metric] == pytest.approx(value, abs=0.02), metric


def test_ctrl_c_stops_every_rank_at_the_same_step_and_keeps_the_checkpoint(synthetic_data, tiny_llama, tmp_path):
    out = tmp_path / "stopped"
    command = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", str(BIN / "cllm4rec"), "train",
               "--data", str(synthetic_data), "--out", str(out), "--backbone", str(tiny_llama),
               "--content-epochs", "0", "--pretrain-epochs", "0", "--finetune-epochs", "10000", "--patience", "0",
               "--batch-size", "8", "--val-users", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 240
    while not (out / METRICS_FILE).exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.5)
    assert (out / METRICS_FILE).exists(), process.communicate(timeout=60)[0][-3000:]
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in the terminal does: the whole process group
    output = process.communicate(timeout=120)[0]
    assert "interrupted after epoch" in output, output[-3000:]
    assert "Timeout" not in output and "timed out" not in output
    assert load_recommender(out, "cpu").checkpoint.meta["metrics"]["epoch"] >= 1


def test_a_time_budget_ends_every_rank_at_the_same_step(synthetic_data, tiny_llama, tmp_path):
    out = tmp_path / "budget"
    result = run_train(synthetic_data, out, tiny_llama, "--finetune-epochs", "10000", "--patience", "0",
                       "--batch-size", "8", "--time-budget", "0.4", ranks=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "time budget of 0.4 min reached" in result.stdout
    records = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert 1 <= len(records) < 10_000 and len({r["epoch"] for r in records}) == len(records)  # rank 0 alone wrote
    assert load_recommender(out, "cpu").checkpoint.meta["metrics"]["epoch"] >= 1
