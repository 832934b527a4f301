"""The backbone's format chosen at load (CLLM4REC_DTYPE=auto): on a CPU ONNX Runtime's float32 or a bfloat16
format (the latter only where the CPU has the units), on CUDA its graphs, when it measured faster and ranks
as PyTorch's float32 does; PyTorch's float32 otherwise, restored exactly; /readyz and the model metric say
which runs."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from model.backbone import load_backbone
from model.checkpoint import load_recommender
from model.cllm4rec import CLLM4Rec, score_prompts
from model.config import ConfigError
from model.onnx_backbone import OnnxBackbone
from model.prompts import PromptTemplates, TokenSpace, build_recommend_prompt
import service.cli as cli
from service import precision
from service.precision import (BFLOAT16_FORMATS, CUDA_GRAPH_FORMATS, MIN_TOP20_OVERLAP, ONNXRUNTIME_FORMATS,
                               candidate_formats, choose_backbone_format, parse_backbone_format,
                               pin_backbone_format, sample_prompts, top20_overlap)
from serving_helpers import metric_value, running_server, server_settings

MAX_BATCH_SIZE = 8  # the formats are compared in batches of 1, 2, 4 and 8 prompts


def served_formats(precision_name: str) -> list[str]:
    """The one or two formats a precision names ("SMALL+LARGE@N" for two)."""
    small, large, _ = parse_backbone_format(precision_name)
    return [small] if large is None else [small, large]


def test_without_bf16_units_only_onnxruntime_is_tried(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: False)
    recommender = load_recommender(tiny_checkpoint, "cpu")
    choice = choose_backbone_format(recommender, MAX_BATCH_SIZE)
    assert set(choice.batch1_ms) == {"float32", *ONNXRUNTIME_FORMATS} and "no bfloat16 units" in choice.reason
    assert set(served_formats(choice.precision)) <= {"float32", *ONNXRUNTIME_FORMATS}
    assert all(p.dtype == torch.float32 for p in recommender.model.backbone.parameters())


def test_the_fastest_format_that_ranks_alike_is_kept(tiny_checkpoint, monkeypatch):
    """Whichever wins on this machine: a format is kept only when it ranks as float32 does and is the fastest
    such at batch 1 (or, for the large batches, at the largest), and a float32 choice gives back the very
    float32 scores."""
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: True)
    recommender = load_recommender(tiny_checkpoint, "cpu")
    prompts = sample_prompts(recommender, 64)
    reference = score_prompts(recommender.model, prompts)
    choice = choose_backbone_format(recommender, MAX_BATCH_SIZE)
    formats = {*ONNXRUNTIME_FORMATS, *BFLOAT16_FORMATS}
    assert set(choice.top20_overlap) == formats
    kept = ["float32", *(name for name in formats if choice.top20_overlap[name] >= MIN_TOP20_OVERLAP)]
    assert set(choice.batch1_ms) == set(choice.largest_batch_ms) == set(kept)  # only those that may be kept are timed
    small, large, _ = parse_backbone_format(choice.precision)
    assert choice.batch1_ms[small] == min(choice.batch1_ms[name] for name in kept)
    if large:
        assert choice.largest_batch_ms[large] == min(choice.largest_batch_ms[name] for name in kept)
    if choice.precision != "float32":
        assert top20_overlap(reference, score_prompts(recommender.model, prompts)) >= MIN_TOP20_OVERLAP
    else:
        assert torch.equal(score_prompts(recommender.model, prompts), reference)
    assert all(p.dtype == (torch.bfloat16 if "bfloat16" in served_formats(choice.precision) else torch.float32)
               for p in recommender.model.backbone.base_model.layers.parameters())
    assert recommender.model.backbone.base_model.embed_tokens.weight.dtype == torch.float32
    assert recommender.model.collab_items.weight.dtype == torch.float32  # tables stay float32 either way


def test_each_format_is_taken_off_exactly(tiny_checkpoint):
    """A format that is tried and not kept leaves PyTorch's float32 backbone as it was: the same scores."""
    recommender = load_recommender(tiny_checkpoint, "cpu")
    prompts = sample_prompts(recommender, 16)
    reference = score_prompts(recommender.model, prompts)
    for name in (*ONNXRUNTIME_FORMATS, *BFLOAT16_FORMATS):
        backbone_format = precision.BackboneFormat(recommender, name, MAX_BATCH_SIZE)
        backbone_format.put_on()
        changed = score_prompts(recommender.model, prompts)
        backbone_format.take_off()
        assert not torch.equal(changed, reference), name  # it was on
        assert torch.equal(score_prompts(recommender.model, prompts), reference), name
    linear = precision.Bfloat16Linear(torch.nn.Linear(8, 4))
    assert linear(torch.randn(3, 8)).dtype == torch.float32 and linear.weight.dtype == torch.bfloat16


def test_onnxruntime_threads_spin_only_when_asked(tiny_checkpoint):
    """CLLM4REC_ONNXRUNTIME_SPINNING reaches the session: sleeping threads by default, spinning ones when set."""
    recommender = load_recommender(tiny_checkpoint, "cpu")
    for spinning in (False, True):
        backbone_format = precision.BackboneFormat(recommender, "float32-onnxruntime", MAX_BATCH_SIZE, spinning)
        backbone_format.put_on()
        options = recommender.model.inference_backbone.session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spinning else "0")
        backbone_format.take_off()


@pytest.mark.parametrize("family,readout", [("llama", False), ("llama", True), ("gpt2", False)])
def test_onnxruntime_scores_as_pytorch_float32(make_backbone, family, readout, caplog):
    """The exported backbone (its later blocks repeated from the second) gives PyTorch's float32 scores (to
    float rounding) for padded batches of prompts of every length, the head reading the last state alone
    or, with a readout, every layer's states; for either family of backbone. The export itself logs nothing
    short of an error."""
    backbone, tokenizer = load_backbone(str(make_backbone(family, n_layers=4)))
    torch.manual_seed(0)
    model = CLLM4Rec(backbone, 6, 40, head_offsets=readout, head_readout=readout)
    with torch.no_grad():
        model.head_readout.normal_(std=0.1)
    space = TokenSpace(tokenizer, model.n_words, 6, 40, PromptTemplates())
    prompts = [build_recommend_prompt(space, u, list(range(u, 4 * u + 1)), 20) for u in range(6)]
    reference = score_prompts(model, prompts)
    with caplog.at_level(logging.INFO):
        model.inference_backbone = OnnxBackbone(backbone, readout, 1)
    assert model.inference_backbone.assembled
    assert [r.getMessage() for r in caplog.records if r.name.split(".")[0] in ("torch", "onnx_ir", "onnxscript")] == []
    scores = score_prompts(model, prompts)
    torch.testing.assert_close(scores, reference, rtol=1e-4, atol=1e-4)
    assert top20_overlap(reference, scores) == 1.0
    torch.testing.assert_close(score_prompts(model, prompts[2:3]), reference[2:3], rtol=1e-4, atol=1e-4)  # alone


def format_on(model: CLLM4Rec, batch_size: int) -> str:
    """Which format runs a pass of this many prompts."""
    if isinstance(model.inference_runner(batch_size), OnnxBackbone):
        return "float32-onnxruntime"
    if model.backbone.base_model.norm.weight.dtype == torch.bfloat16:
        return "bfloat16"
    if any(isinstance(module, precision.Bfloat16Linear) for module in model.backbone.modules()):
        return "bfloat16-linear"
    return "float32"


@pytest.mark.parametrize("small,large", [("float32-onnxruntime", "bfloat16"), ("bfloat16", "float32-onnxruntime")])
def test_small_and_large_batches_each_run_their_fastest_format(tiny_checkpoint, monkeypatch, small, large):
    """Where one format is faster at batch 1 and another, able to run beside it, from some batch size on, each
    serves its batches: the switch is at the first batch size timed where the second is faster (here 4 of
    1, 2, 4, 8), and the scores of each side are that format's."""
    per_prompt = {small: (1.0, 4.0), large: (3.0, 2.0)}  # (ms of a lone prompt, ms per prompt more)

    def timed(recommender, prompts, *args):
        first, more = per_prompt.get(format_on(recommender.model, len(prompts)), (100.0, 100.0))
        return first + more * (len(prompts) - 1)

    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: True)
    monkeypatch.setattr(precision, "median_ms", timed)
    monkeypatch.setattr(precision, "MIN_TOP20_OVERLAP", 0.0)  # the tiny model's rankings are not the point
    recommender = load_recommender(tiny_checkpoint, "cpu")
    prompts = sample_prompts(recommender, 16)
    by_format = {}
    for name in (small, large):
        backbone_format = precision.BackboneFormat(recommender, name, MAX_BATCH_SIZE)
        backbone_format.put_on()
        by_format[name] = score_prompts(recommender.model, prompts[:3]), score_prompts(recommender.model, prompts[:4])
        backbone_format.take_off()
    choice = choose_backbone_format(recommender, MAX_BATCH_SIZE)
    model = recommender.model
    assert choice.precision == f"{small}+{large}@4" and choice.from_batch == 4
    assert [format_on(model, size) for size in (1, 3, 4, 8, 64)] == [small, small, large, large, large]
    torch.testing.assert_close(score_prompts(model, prompts[:3]), by_format[small][0], rtol=0, atol=0)
    torch.testing.assert_close(score_prompts(model, prompts[:4]), by_format[large][1], rtol=0, atol=0)


def test_a_server_of_single_prompts_times_batch_1_only(tiny_checkpoint, monkeypatch):
    """CLLM4REC_MAX_BATCH_SIZE=1: there is no larger batch to time or to give another format."""
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: True)
    recommender = load_recommender(tiny_checkpoint, "cpu")
    choice = choose_backbone_format(recommender, 1)
    assert "+" not in choice.precision and choice.from_batch is None and not choice.largest_batch_ms
    assert choice.reason.count("forward") == 1 and "batch-1 forward" in choice.reason


def test_formats_share_only_where_neither_changes_the_others_weights():
    assert precision.can_share("float32-onnxruntime", "bfloat16") and precision.can_share("bfloat16-linear",
                                                                                         "float32-onnxruntime")
    assert precision.can_share("float32-cuda-graphs", "float32")
    assert not precision.can_share("float32-cuda-graphs", "bfloat16")  # the graphs read PyTorch's weights in place
    assert not precision.can_share("bfloat16", "bfloat16-linear") and not precision.can_share("bfloat16", "float32")


def test_cuda_graphs_are_tried_on_cuda_only(tiny_checkpoint):
    recommender = load_recommender(tiny_checkpoint, "cpu")
    assert not set(candidate_formats(recommender.model)) & set(CUDA_GRAPH_FORMATS)


@pytest.mark.parametrize("failing", ["float32-onnxruntime", "float32-cuda-graphs"])
def test_a_format_that_cannot_be_put_on_is_left_out(tiny_checkpoint, monkeypatch, failing):
    """An exporter failure (a backbone ONNX cannot take) or a failed capture (here: CUDA graphs asked of a
    CPU model, which has no CUDA stream to capture on) costs that candidate only: the choice goes on and
    PyTorch's backbone stays as it was."""
    def refuse(*args, **kwargs):
        raise RuntimeError("no exporter for this backbone")

    monkeypatch.setattr(precision, "OnnxBackbone", refuse)
    monkeypatch.setattr(precision, "candidate_formats", lambda model: (failing,))
    recommender = load_recommender(tiny_checkpoint, "cpu")
    prompts = sample_prompts(recommender, 8)
    reference = score_prompts(recommender.model, prompts)
    choice = choose_backbone_format(recommender, MAX_BATCH_SIZE)
    assert choice.precision == "float32" and f"{failing} failed" in choice.reason
    assert recommender.model.inference_backbone is None
    assert torch.equal(score_prompts(recommender.model, prompts), reference)


def test_readiness_and_the_model_metric_name_the_precision(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(precision, "candidate_formats", lambda model: ())
    with running_server(server_settings(tiny_checkpoint, dtype="auto")) as server, server.client() as client:
        assert client.get("/readyz").json()["precision"] == "float32"
        assert metric_value(client.get("/metrics").text, "cllm4rec_model_info", precision="float32") == 1
    monkeypatch.setattr(precision, "candidate_formats", lambda model: ONNXRUNTIME_FORMATS)
    monkeypatch.setattr(precision, "MIN_TOP20_OVERLAP", 0.0)  # kept whenever faster, as it is on this CPU
    with running_server(server_settings(tiny_checkpoint, dtype="auto")) as server, server.client() as client:
        ready = client.get("/readyz").json()["precision"]
        assert set(served_formats(ready)) <= {"float32", "float32-onnxruntime"}
        assert metric_value(client.get("/metrics").text, "cllm4rec_model_info", precision=ready) == 1
    with running_server(server_settings(tiny_checkpoint, dtype="bfloat16")) as server, server.client() as client:
        assert client.get("/readyz").json()["precision"] == "bfloat16"


def untimed(*args, **kwargs):
    raise AssertionError("a pinned format is not timed")


@pytest.mark.parametrize("pinned", ["float32-onnxruntime", "float32-onnxruntime+bfloat16@4",
                                    "bfloat16+float32-onnxruntime@4", "float32"])
def test_a_pinned_format_is_served_untimed(tiny_checkpoint, monkeypatch, pinned):
    """CLLM4REC_BACKBONE_FORMAT names the format as /readyz reports it; it is put on without timing anything
    (every replica serves the same one), two formats each take their batch sizes, and its agreement with
    float32 is still measured."""
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: True)
    monkeypatch.setattr(precision, "median_ms", untimed)
    recommender = load_recommender(tiny_checkpoint, "cpu")
    choice = pin_backbone_format(recommender, pinned, MAX_BATCH_SIZE)
    assert choice.precision == pinned and "CLLM4REC_BACKBONE_FORMAT" in choice.reason
    assert 0 < choice.top20_overlap[pinned] <= 1
    small, large, from_batch = parse_backbone_format(pinned)
    expected = [small] * 2 + [large] * 3 if large else [small] * 5
    assert [format_on(recommender.model, size) for size in (1, 3, 4, 8, 64)] == expected
    assert choice.from_batch == from_batch


@pytest.mark.parametrize("pinned, message", [
    ("float16", "unknown backbone format 'float16'"),
    ("float32-onnxruntime+bfloat16", "the batch size where the second takes over"),
    ("float32-onnxruntime+bfloat16@1", "the batch size where the second takes over"),
    ("bfloat16@4", "@N goes with two formats"),
    ("bfloat16+bfloat16-linear@4", "cannot serve side by side"),
    ("float32-cuda-graphs", "float32-cuda-graphs is not available on this cpu"),
])
def test_a_pinned_format_that_cannot_serve_here_is_refused(tiny_checkpoint, monkeypatch, pinned, message):
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: True)
    recommender = load_recommender(tiny_checkpoint, "cpu")
    with pytest.raises(ConfigError, match=re.escape(message)):
        pin_backbone_format(recommender, pinned, MAX_BATCH_SIZE)
    assert all(p.dtype == torch.float32 for p in recommender.model.backbone.parameters())


def test_bfloat16_is_refused_on_a_cpu_without_the_units(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: False)
    recommender = load_recommender(tiny_checkpoint, "cpu")
    with pytest.raises(ConfigError, match="bfloat16 is not available on this cpu"):
        pin_backbone_format(recommender, "bfloat16", MAX_BATCH_SIZE)


def test_the_server_serves_the_pinned_format_and_refuses_a_bad_one(tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(precision, "median_ms", untimed)
    settings = server_settings(tiny_checkpoint, dtype="auto", backbone_format="float32-onnxruntime")
    with running_server(settings) as server, server.client() as client:
        assert client.get("/readyz").json()["precision"] == "float32-onnxruntime"
        assert metric_value(client.get("/metrics").text, "cllm4rec_model_info",
                            precision="float32-onnxruntime") == 1
    monkeypatch.setenv("CLLM4REC_BACKBONE_FORMAT", "float32-onnx")
    assert cli.main(["serve", "--checkpoint", str(tiny_checkpoint)]) == 2
    assert "unknown backbone format 'float32-onnx'" in capsys.readouterr().err
    monkeypatch.setenv("CLLM4REC_BACKBONE_FORMAT", "float32-onnxruntime")
    monkeypatch.setenv("CLLM4REC_DTYPE", "bfloat16")
    assert cli.main(["serve", "--checkpoint", str(tiny_checkpoint)]) == 2
    assert "needs CLLM4REC_DTYPE=auto" in capsys.readouterr().err
