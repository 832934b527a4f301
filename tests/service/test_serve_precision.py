"""The CPU path chosen at load (CLLM4REC_DTYPE=auto): bfloat16 only where the CPU has the units, it measured
faster and it ranks as float32 does; float32 otherwise, restored exactly; /readyz and the model metric say
which runs."""

from __future__ import annotations

import torch

from model.checkpoint import load_recommender
from model.cllm4rec import score_prompts
from service import precision
from service.precision import BFLOAT16_FORMATS, MIN_TOP20_OVERLAP, choose_cpu_precision, sample_prompts, top20_overlap
from serving_helpers import metric_value, running_server, server_settings


def test_without_bf16_units_the_backbone_stays_float32_untried(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: False)
    recommender = load_recommender(tiny_checkpoint, "cpu")
    choice = choose_cpu_precision(recommender)
    assert choice.precision == "float32" and "no bfloat16 units" in choice.reason and not choice.batch1_ms
    assert all(p.dtype == torch.float32 for p in recommender.model.backbone.parameters())


def test_with_bf16_units_the_fastest_format_that_ranks_alike_is_kept(tiny_checkpoint, monkeypatch):
    """Whichever wins on this machine: a bfloat16 format is kept only when faster with the same top 20, and a
    float32 choice gives back the very float32 scores."""
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: True)
    recommender = load_recommender(tiny_checkpoint, "cpu")
    prompts = sample_prompts(recommender, 64)
    reference = score_prompts(recommender.model, prompts)
    choice = choose_cpu_precision(recommender)
    assert set(choice.batch1_ms) == {"float32", *BFLOAT16_FORMATS}
    assert set(choice.top20_overlap) == set(BFLOAT16_FORMATS)
    if choice.precision != "float32":
        assert choice.batch1_ms[choice.precision] == min(choice.batch1_ms.values())
        assert top20_overlap(reference, score_prompts(recommender.model, prompts)) >= MIN_TOP20_OVERLAP
    else:
        assert torch.equal(score_prompts(recommender.model, prompts), reference)
    assert all(p.dtype == (torch.bfloat16 if choice.precision == "bfloat16" else torch.float32)
               for p in recommender.model.backbone.base_model.embed_tokens.parameters())
    assert recommender.model.collab_items.weight.dtype == torch.float32  # tables stay float32 either way


def test_each_bfloat16_format_is_taken_off_exactly(tiny_checkpoint):
    """A format that is tried and not kept leaves the float32 backbone as it was: the same scores."""
    recommender = load_recommender(tiny_checkpoint, "cpu")
    prompts = sample_prompts(recommender, 16)
    reference = score_prompts(recommender.model, prompts)
    for name in BFLOAT16_FORMATS:
        backbone_format = precision.BackboneFormat(recommender.model.backbone, name)
        backbone_format.put_on()
        changed = score_prompts(recommender.model, prompts)
        backbone_format.take_off()
        assert not torch.equal(changed, reference)  # it was on
        assert torch.equal(score_prompts(recommender.model, prompts), reference)
    linear = precision.Bfloat16Linear(torch.nn.Linear(8, 4))
    assert linear(torch.randn(3, 8)).dtype == torch.float32 and linear.weight.dtype == torch.bfloat16


def test_readiness_and_the_model_metric_name_the_precision(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: False)
    with running_server(server_settings(tiny_checkpoint, dtype="auto")) as server, server.client() as client:
        assert client.get("/readyz").json()["precision"] == "float32"
        assert metric_value(client.get("/metrics").text, "cllm4rec_model_info", precision="float32") == 1
    with running_server(server_settings(tiny_checkpoint, dtype="bfloat16")) as server, server.client() as client:
        assert client.get("/readyz").json()["precision"] == "bfloat16"
