"""The CPU path chosen at load (CLLM4REC_DTYPE=auto): bfloat16 only where the CPU has the units, it measured
faster and it ranks as float32 does; float32 otherwise, restored exactly; /readyz and the model metric say
which runs."""

from __future__ import annotations

import torch

from model.checkpoint import load_recommender
from model.cllm4rec import score_prompts
from service import precision
from service.precision import MIN_TOP20_OVERLAP, choose_cpu_precision, sample_prompts, top20_overlap
from serving_helpers import metric_value, running_server, server_settings


def test_without_bf16_units_the_backbone_stays_float32_untried(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: False)
    recommender = load_recommender(tiny_checkpoint, "cpu")
    choice = choose_cpu_precision(recommender)
    assert choice.precision == "float32" and "no bfloat16 units" in choice.reason and not choice.batch1_ms
    assert all(p.dtype == torch.float32 for p in recommender.model.backbone.parameters())


def test_with_bf16_units_the_faster_format_that_ranks_alike_is_kept(tiny_checkpoint, monkeypatch):
    """Whichever wins on this machine: bfloat16 is kept only when faster with the same top 20, and a float32
    choice gives back the very float32 scores."""
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: True)
    recommender = load_recommender(tiny_checkpoint, "cpu")
    prompts = sample_prompts(recommender, 64)
    reference = score_prompts(recommender.model, prompts)
    choice = choose_cpu_precision(recommender)
    dtypes = {p.dtype for p in recommender.model.backbone.parameters()}
    assert set(choice.batch1_ms) == {"float32", "bfloat16"} and choice.top20_overlap is not None
    if choice.precision == "bfloat16":
        assert dtypes == {torch.bfloat16}
        assert choice.batch1_ms["bfloat16"] < choice.batch1_ms["float32"]
        assert top20_overlap(reference, score_prompts(recommender.model, prompts)) >= MIN_TOP20_OVERLAP
    else:
        assert dtypes == {torch.float32}
        assert torch.equal(score_prompts(recommender.model, prompts), reference)
    assert recommender.model.collab_items.weight.dtype == torch.float32  # tables stay float32 either way


def test_readiness_and_the_model_metric_name_the_precision(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: False)
    with running_server(server_settings(tiny_checkpoint, dtype="auto")) as server, server.client() as client:
        assert client.get("/readyz").json()["precision"] == "float32"
        assert metric_value(client.get("/metrics").text, "cllm4rec_model_info", precision="float32") == 1
    with running_server(server_settings(tiny_checkpoint, dtype="bfloat16")) as server, server.client() as client:
        assert client.get("/readyz").json()["precision"] == "bfloat16"
