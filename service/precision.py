"""The served backbone's format on a CPU, chosen by measurement when a checkpoint loads.

With CLLM4REC_DTYPE=auto on a CPU the loaded float32 backbone is timed on a one-prompt forward pass as
PyTorch runs it, then in each other format (candidate_formats): float32 through ONNX Runtime
(model/onnx_backbone.py) and, where the CPU has bfloat16 units (AVX-512 BF16 or AMX, read from its
flags by model/precision.py), the whole backbone in bfloat16 or only its linear maps with float32
activations between them. The fastest format that is faster than PyTorch's float32 and whose top 20 items
agree with its top 20 on at least MIN_TOP20_OVERLAP of sample prompts (the checkpoint's own users, prompts
as served) stays, else the float32 backbone comes back exactly. On a CPU without the units bfloat16 is
emulated, about ten times slower (docs/benchmarks.md), so it is not tried. The user and item tables and
the item head stay float32 and PyTorch's either way: the head always computes in float32
(CLLM4Rec.item_logits), and the tables are per-user memory that CLLM4REC_DTYPE=bfloat16 halves when
asked for explicitly. Measured choices: docs/benchmarks.md ("Precision of the served model").
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from model.checkpoint import Recommender
from model.cllm4rec import CLLM4Rec, score_prompts
from model.precision import BF16_CPU_FLAGS, cpu_has_bf16_units
from model.prompts import build_recommend_prompt
from model.onnx_backbone import OnnxBackbone

log = logging.getLogger(__name__)

MIN_TOP20_OVERLAP = 0.98  # the share of PyTorch float32's top 20 that another format must return too
# The candidates, each put on, timed and taken off: float32 through ONNX Runtime, and the bfloat16 formats.
ONNXRUNTIME_FORMATS = ("float32-onnxruntime",)
BFLOAT16_FORMATS = ("bfloat16", "bfloat16-linear")
SAMPLE_PROMPTS = 64  # users whose prompts compare the formats' rankings
# Forward passes timed per format (the median counts), after WARM_UP_PASSES: with 7 after one, the 4-layer
# quickstart model's choice flipped between formats 1.3 ms apart (docs/benchmarks.md).
TIMING_REPEATS = 21
WARM_UP_PASSES = 3


@dataclass
class PrecisionChoice:
    precision: str  # the backbone's format: "float32" (PyTorch), or one of ONNXRUNTIME_FORMATS, BFLOAT16_FORMATS
    reason: str  # one line for the log
    batch1_ms: dict[str, float] = field(default_factory=dict)  # median forward time per format tried
    top20_overlap: dict[str, float] = field(default_factory=dict)  # each other format's agreement with float32


class Bfloat16Linear(nn.Module):
    """A linear map that multiplies in bfloat16 between float32 activations: its weights are stored in
    bfloat16, while the residual stream, the norms and the attention between the maps stay float32, so
    bfloat16's rounding does not pile up along the blocks' residual additions (at 30 layers the whole
    backbone in bfloat16 shared 96% of float32's top 20, below MIN_TOP20_OVERLAP; docs/benchmarks.md)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().to(torch.bfloat16), requires_grad=False)
        self.bias = None if linear.bias is None else \
            nn.Parameter(linear.bias.detach().to(torch.bfloat16), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)


class BackboneFormat:
    """One way of running the backbone, put on and taken off exactly: "bfloat16" converts every parameter
    (buffers such as the rotary frequencies stay float32: the attention casts its rotation to the
    activations' format), "bfloat16-linear" swaps the blocks' linear maps for Bfloat16Linear, and
    "float32-onnxruntime" runs the float32 backbone through ONNX Runtime (model/onnx_backbone.py)."""

    def __init__(self, model: CLLM4Rec, name: str):
        self.name = name
        self.model = model
        self.parameters = list(model.backbone.parameters())
        self.float32_weights = [p.data for p in self.parameters]
        self.linear_maps = [(parent, child_name, child) for parent in model.backbone.base_model.modules()
                            for child_name, child in parent.named_children() if isinstance(child, nn.Linear)]
        self.runner: OnnxBackbone | None = None  # exported on the first put_on

    def put_on(self) -> None:
        if self.name == "bfloat16":
            for p in self.parameters:
                p.data = p.data.to(torch.bfloat16)
        elif self.name == "bfloat16-linear":
            for parent, child_name, child in self.linear_maps:
                setattr(parent, child_name, Bfloat16Linear(child))
        else:
            if self.runner is None:
                self.runner = OnnxBackbone.of(self.model)
            self.model.inference_backbone = self.runner

    def take_off(self) -> None:
        for p, weights in zip(self.parameters, self.float32_weights):
            p.data = weights
        for parent, child_name, child in self.linear_maps:
            setattr(parent, child_name, child)
        self.model.inference_backbone = None


def sample_prompts(recommender: Recommender, n: int) -> list[list[int]]:
    """Served prompts of the checkpoint's first n users with training items."""
    train = recommender.checkpoint.split.train
    users = [u for u, items in enumerate(train) if len(items)][:n]
    return [build_recommend_prompt(recommender.space, u, train[u].tolist(), recommender.max_history) for u in users]


def median_ms(recommender: Recommender, prompt: list[int]) -> float:
    for _ in range(WARM_UP_PASSES):  # the first passes of a format pay for its kernels' set-up
        score_prompts(recommender.model, [prompt])
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


def candidate_formats() -> tuple[str, ...]:
    """The formats worth trying on this CPU: ONNX Runtime's float32 anywhere, bfloat16 only with its units."""
    return ONNXRUNTIME_FORMATS + (BFLOAT16_FORMATS if cpu_has_bf16_units() else ())


def choose_cpu_precision(recommender: Recommender) -> PrecisionChoice:
    """Leave the recommender's float32 backbone in the fastest format whose rankings agree (see above)."""
    prompts = sample_prompts(recommender, SAMPLE_PROMPTS)
    if not prompts:
        return PrecisionChoice("float32", "no training users to compare the formats on")
    reference = score_prompts(recommender.model, prompts)
    timings, overlaps, failed = {"float32": median_ms(recommender, prompts[0])}, {}, []
    formats = {}
    for name in candidate_formats():
        backbone_format = BackboneFormat(recommender.model, name)
        try:
            backbone_format.put_on()
        except Exception as e:  # a backbone the exporter cannot take: that format is not a candidate
            log.warning("backbone format %s unavailable: %r", name, e)
            failed.append(name)
            backbone_format.take_off()
            continue
        formats[name] = backbone_format
        timings[name] = median_ms(recommender, prompts[0])
        overlaps[name] = top20_overlap(reference, score_prompts(recommender.model, prompts))
        backbone_format.take_off()
    shown = "batch-1 forward " + ", ".join(f"{timings[name]:.1f} ms {name}" for name in timings) + "; top 20 shared " \
        + ", ".join(f"{overlaps[name]:.3f} {name}" for name in overlaps) \
        + ("" if cpu_has_bf16_units() else f"; no bfloat16 units ({' or '.join(BF16_CPU_FLAGS)})") \
        + "".join(f"; {name} failed" for name in failed)
    agreeing = [name for name in formats if overlaps[name] >= MIN_TOP20_OVERLAP and timings[name] < timings["float32"]]
    if not agreeing:
        return PrecisionChoice("float32", f"float32 backbone, the others were slower or ranked differently ({shown})",
                               timings, overlaps)
    fastest = min(agreeing, key=timings.get)
    formats[fastest].put_on()
    return PrecisionChoice(fastest, f"{fastest} backbone ({shown})", timings, overlaps)
