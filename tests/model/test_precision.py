"""bfloat16 compute where the hardware has it, float32 elsewhere, and the item head always float32."""

from __future__ import annotations

import json

import pytest
import torch

from model import precision
from model.checkpoint import METRICS_FILE, load_recommender
from model.cllm4rec import score_prompts
from model.prompts import build_recommend_prompt
from model.train import train
from training_helpers import quick_config


@pytest.mark.parametrize("device, units, mode, expected, warned", [
    ("cpu", True, "auto", None, False),  # the cpu recipe's pass measured no faster in bf16, even with the units
    ("cuda", False, "auto", torch.bfloat16, False),
    ("cpu", True, "bf16", torch.bfloat16, False),
    ("cpu", False, "bf16", torch.bfloat16, True),  # emulated: about 10x slower, said so
    ("cpu", True, "off", None, False),
])
def test_bf16_is_used_where_asked_and_emulation_is_flagged(monkeypatch, device, units, mode, expected, warned):
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: units)
    dtype = precision.autocast_dtype(torch.device(device), mode)
    assert dtype == expected
    assert (precision.slow_bf16_note(torch.device(device), dtype) is not None) == warned


def test_cpu_flags_decide_bf16_units(monkeypatch, tmp_path):
    assert isinstance(precision.cpu_has_bf16_units(), bool)
    for flags, expected in (("fpu sse avx2 avx512f", False), ("fpu avx512f avx512_bf16", True), ("amx_bf16", True)):
        cpuinfo = tmp_path / f"cpuinfo-{expected}-{len(flags)}"
        cpuinfo.write_text(f"processor : 0\nflags : {flags}\n")
        monkeypatch.setattr(precision, "Path", lambda _, path=cpuinfo: path)
        precision.cpu_has_bf16_units.cache_clear()
        assert precision.cpu_has_bf16_units() is expected
    precision.cpu_has_bf16_units.cache_clear()


def test_training_in_bf16_on_the_cpu_learns_and_scores_in_float32(synthetic_data, tiny_llama, tmp_path):
    out = tmp_path / "bf16"
    train(quick_config(synthetic_data, out, tiny_llama, pretrain_epochs=0, finetune_epochs=3, autocast="bf16"))
    records = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    losses = [r["passes"]["recommend"]["nll_per_target"] for r in records]
    assert losses[-1] < losses[0], losses
    recommender = load_recommender(out, "cpu")
    split = recommender.checkpoint.split
    prompts = [build_recommend_prompt(recommender.space, u, split.train[u].tolist(), 10) for u in range(4)]
    scores = score_prompts(recommender.model, prompts)
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
