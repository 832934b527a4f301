"""The served backbone's number format on a CPU, chosen by measurement when a checkpoint loads.

With CLLM4REC_DTYPE=auto on a CPU that has bfloat16 units (AVX-512 BF16 or AMX, read from its flags by
model/precision.py), the loaded float32 backbone is timed on a one-prompt forward pass, then converted
to bfloat16 and timed again; bfloat16 stays when it is faster and its top 20 items agree with float32's
on at least MIN_TOP20_OVERLAP of sample prompts (the checkpoint's own users, prompts as served), else
the float32 weights come back exactly. On a CPU without the units bfloat16 is emulated, about ten times
slower (docs/benchmarks.md), so float32 is kept without trying. The user and item tables and the item
head stay float32 either way: the head always computes in float32 (CLLM4Rec.item_logits), and the
tables are per-user memory that CLLM4REC_DTYPE=bfloat16 halves when asked for explicitly.

On this project's 2-core AVX-512 BF16 machine the 4-layer quickstart model scored a batch of 64 in
50 ms in bfloat16 against 175 ms in float32, 98.5% of its top 20 shared (docs/benchmarks.md).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from model.checkpoint import Recommender
from model.cllm4rec import score_prompts
from model.precision import BF16_CPU_FLAGS, cpu_has_bf16_units
from model.prompts import build_recommend_prompt

MIN_TOP20_OVERLAP = 0.98  # the share of float32's top 20 that bfloat16 must return too
SAMPLE_PROMPTS = 64  # users whose prompts compare the two formats' rankings
TIMING_REPEATS = 7  # forward passes timed per format (the median counts)


@dataclass
class PrecisionChoice:
    precision: str  # the backbone's weights: "float32" or "bfloat16"
    reason: str  # one line for the log
    batch1_ms: dict[str, float] = field(default_factory=dict)  # median forward time per format tried
    top20_overlap: float | None = None  # bfloat16's agreement with float32, when tried


def sample_prompts(recommender: Recommender, n: int) -> list[list[int]]:
    """Served prompts of the checkpoint's first n users with training items."""
    train = recommender.checkpoint.split.train
    users = [u for u, items in enumerate(train) if len(items)][:n]
    return [build_recommend_prompt(recommender.space, u, train[u].tolist(), recommender.max_history) for u in users]


def median_ms(recommender: Recommender, prompt: list[int]) -> float:
    score_prompts(recommender.model, [prompt])  # the first pass of a format pays for its kernels' set-up
    times = []
    for _ in range(TIMING_REPEATS):
        started = time.perf_counter()
        score_prompts(recommender.model, [prompt])
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def top20_overlap(reference: torch.Tensor, other: torch.Tensor) -> float:
    k = min(20, reference.shape[1])
    a, b = torch.topk(reference, k).indices, torch.topk(other, k).indices
    return sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b)) / (k * len(a))


def choose_cpu_precision(recommender: Recommender) -> PrecisionChoice:
    """Leave the recommender's float32 backbone in the faster format whose rankings agree (see above)."""
    if not cpu_has_bf16_units():
        return PrecisionChoice("float32", f"this CPU has no bfloat16 units ({' or '.join(BF16_CPU_FLAGS)})")
    prompts = sample_prompts(recommender, SAMPLE_PROMPTS)
    if not prompts:
        return PrecisionChoice("float32", "no training users to compare the formats on")
    backbone = recommender.model.backbone
    reference = score_prompts(recommender.model, prompts)
    timings = {"float32": median_ms(recommender, prompts[0])}
    # The parameters alone: buffers such as the rotary frequencies stay float32 (the attention casts its
    # rotation to the activations' format), and the float32 tensors are kept to be put back exactly.
    parameters = list(backbone.parameters())
    float32_weights = [p.data for p in parameters]
    for p in parameters:
        p.data = p.data.to(torch.bfloat16)
    timings["bfloat16"] = median_ms(recommender, prompts[0])
    overlap = top20_overlap(reference, score_prompts(recommender.model, prompts))
    shown = f"batch-1 forward {timings['float32']:.1f} ms float32, {timings['bfloat16']:.1f} ms bfloat16; " \
            f"top 20 shared {overlap:.3f}"
    if timings["bfloat16"] < timings["float32"] and overlap >= MIN_TOP20_OVERLAP:
        return PrecisionChoice("bfloat16", f"bfloat16 backbone ({shown})", timings, overlap)
    for p, weights in zip(parameters, float32_weights):
        p.data = weights
    return PrecisionChoice("float32", f"float32 backbone, bfloat16 was slower or ranked differently ({shown})",
                           timings, overlap)
