"""The served backbone's format, chosen by measurement when a checkpoint loads.

With CLLM4REC_DTYPE=auto the loaded float32 backbone is timed on a one-prompt forward pass as PyTorch
runs it (on CUDA computing in bfloat16 under autocast, as validation does), then in each other format
(candidate_formats). On a CPU: float32 through ONNX Runtime (model/onnx_backbone.py) and, where the CPU
has bfloat16 units (AVX-512 BF16 or AMX, read from its flags by model/precision.py), the whole backbone
in bfloat16 or only its linear maps with float32 activations between them. On CUDA: the same passes
replayed from CUDA graphs over bucketed shapes (model/cuda_graphs.py; SDPA attention only). The fastest
format that is faster than PyTorch's and whose top 20 items agree with its top 20 on at least
MIN_TOP20_OVERLAP of sample prompts (the checkpoint's own users, prompts as served, in batches of every
size up to the largest) stays, else PyTorch's backbone comes back exactly. On a CPU without the units
bfloat16 is emulated, about ten times slower (docs/benchmarks.md), so it is not tried. The user and item
tables and the item head stay float32 and PyTorch's either way: the head always computes in float32
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
from model.cuda_graphs import GraphedBackbone, batch_buckets
from model.onnx_backbone import OnnxBackbone
from model.precision import BF16_CPU_FLAGS, cpu_has_bf16_units
from model.prompts import build_recommend_prompt, longest_recommend_prompt

log = logging.getLogger(__name__)

MIN_TOP20_OVERLAP = 0.98  # the share of PyTorch float32's top 20 that another format must return too
# The candidates, each put on, timed and taken off: on a CPU float32 through ONNX Runtime and the bfloat16
# formats, on CUDA the graphs.
ONNXRUNTIME_FORMATS = ("float32-onnxruntime",)
BFLOAT16_FORMATS = ("bfloat16", "bfloat16-linear")
CUDA_GRAPH_FORMATS = ("float32-cuda-graphs",)
SAMPLE_PROMPTS = 64  # users whose prompts compare the formats' rankings
# Forward passes timed per format (the median counts), after WARM_UP_PASSES: with 7 after one, the 4-layer
# quickstart model's choice flipped between formats 1.3 ms apart (docs/benchmarks.md).
TIMING_REPEATS = 21
WARM_UP_PASSES = 3


@dataclass
class PrecisionChoice:
    precision: str  # the backbone's format: "float32" (PyTorch), or one of the *_FORMATS
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
    activations' format), "bfloat16-linear" swaps the blocks' linear maps for Bfloat16Linear,
    "float32-onnxruntime" runs the float32 backbone through ONNX Runtime (model/onnx_backbone.py), and
    "float32-cuda-graphs" replays its passes from CUDA graphs (model/cuda_graphs.py) for batches of up to
    max_batch_size prompts."""

    def __init__(self, recommender: Recommender, name: str, max_batch_size: int, spinning: bool = False):
        self.name = name
        self.recommender = recommender
        self.max_batch_size = max_batch_size
        self.spinning = spinning  # ONNX Runtime's threads (CLLM4REC_ONNXRUNTIME_SPINNING)
        model = self.model = recommender.model
        self.parameters = list(model.backbone.parameters())
        self.float32_weights = [p.data for p in self.parameters]
        self.linear_maps = [(parent, child_name, child) for parent in model.backbone.base_model.modules()
                            for child_name, child in parent.named_children() if isinstance(child, nn.Linear)]
        self.runner: OnnxBackbone | GraphedBackbone | None = None  # made on the first put_on

    def put_on(self) -> None:
        if self.name == "bfloat16":
            for p in self.parameters:
                p.data = p.data.to(torch.bfloat16)
        elif self.name == "bfloat16-linear":
            for parent, child_name, child in self.linear_maps:
                setattr(parent, child_name, Bfloat16Linear(child))
        else:
            if self.runner is None:
                self.runner = OnnxBackbone.of(self.model, self.spinning) if self.name in ONNXRUNTIME_FORMATS else \
                    GraphedBackbone.of(self.model, self.max_batch_size, longest_recommend_prompt(
                        self.recommender.space, self.recommender.max_history))
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
    """The median time of a one-prompt pass until its scores can be read (a GPU's work included)."""
    for _ in range(WARM_UP_PASSES):  # the first passes of a format pay for its kernels' set-up
        score_prompts(recommender.model, [prompt])
    times = []
    for _ in range(TIMING_REPEATS):
        started = time.perf_counter()
        score_prompts(recommender.model, [prompt])[0, 0].item()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def score_in_batches(model: CLLM4Rec, prompts: list[list[int]], max_batch_size: int) -> torch.Tensor:
    """score_prompts in batches of each size 1, 2, 4, ... up to max_batch_size in turn, so a format is
    compared in the batch shapes it serves (CUDA graphs have one per size)."""
    sizes, scores, start = batch_buckets(max_batch_size), [], 0
    while start < len(prompts):
        size = sizes[len(scores) % len(sizes)]
        scores.append(score_prompts(model, prompts[start : start + size]))
        start += size
    return torch.cat(scores)


def top20_overlap(reference: torch.Tensor, other: torch.Tensor) -> float:
    k = min(20, reference.shape[1])
    a, b = torch.topk(reference, k).indices, torch.topk(other, k).indices
    return sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b)) / (k * len(a))


def candidate_formats(model: CLLM4Rec) -> tuple[str, ...]:
    """The formats worth trying for the model's device: on CUDA the graphs (where the attention is SDPA's,
    whose mask the graphs make), on a CPU ONNX Runtime's float32 and, with bfloat16 units, bfloat16."""
    if model.collab_items.weight.device.type == "cuda":
        return CUDA_GRAPH_FORMATS if model.backbone.config._attn_implementation == "sdpa" else ()
    return ONNXRUNTIME_FORMATS + (BFLOAT16_FORMATS if cpu_has_bf16_units() else ())


def choose_backbone_format(recommender: Recommender, max_batch_size: int, spinning: bool = False) -> PrecisionChoice:
    """Leave the recommender's float32 backbone in the fastest format whose rankings agree (see above);
    max_batch_size: the largest batch it will be asked to score (CLLM4REC_MAX_BATCH_SIZE); spinning: ONNX
    Runtime's threads spin (CLLM4REC_ONNXRUNTIME_SPINNING)."""
    on_cuda = recommender.device.type == "cuda"
    prompts = sample_prompts(recommender, SAMPLE_PROMPTS)
    if not prompts:
        return PrecisionChoice("float32", "no training users to compare the formats on")
    reference = score_in_batches(recommender.model, prompts, max_batch_size)
    timings, overlaps, failed = {"float32": median_ms(recommender, prompts[0])}, {}, []
    formats = {}
    for name in candidate_formats(recommender.model):
        backbone_format = BackboneFormat(recommender, name, max_batch_size, spinning)
        try:
            backbone_format.put_on()
            timings[name] = median_ms(recommender, prompts[0])
            overlaps[name] = top20_overlap(reference, score_in_batches(recommender.model, prompts, max_batch_size))
        except Exception as e:  # a backbone the exporter or a capture cannot take: not a candidate
            log.warning("backbone format %s unavailable: %r", name, e)
            failed.append(name)
            timings.pop(name, None)
            continue
        finally:
            backbone_format.take_off()
        formats[name] = backbone_format
    shown = "batch-1 forward " + ", ".join(f"{timings[name]:.1f} ms {name}" for name in timings) + "; top 20 shared " \
        + ", ".join(f"{overlaps[name]:.3f} {name}" for name in overlaps) \
        + ("; float32 weights computing in bfloat16 (autocast)" if on_cuda else
           "" if cpu_has_bf16_units() else f"; no bfloat16 units ({' or '.join(BF16_CPU_FLAGS)})") \
        + "".join(f"; {name} failed" for name in failed)
    agreeing = [name for name in formats if overlaps[name] >= MIN_TOP20_OVERLAP and timings[name] < timings["float32"]]
    if not agreeing:
        return PrecisionChoice("float32", f"float32 backbone, the others were slower or ranked differently ({shown})",
                               timings, overlaps)
    fastest = min(agreeing, key=timings.get)
    formats[fastest].put_on()
    return PrecisionChoice(fastest, f"{fastest} backbone ({shown})", timings, overlaps)
