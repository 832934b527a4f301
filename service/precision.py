"""The served backbone's format, chosen by measurement when a checkpoint loads.

With CLLM4REC_DTYPE=auto the loaded float32 backbone is timed on a one-prompt forward pass as PyTorch
runs it (on CUDA computing in bfloat16 under autocast, as validation does), then in each other format
(candidate_formats). On a CPU: float32 through ONNX Runtime (model/onnx_backbone.py) and, where the CPU
has bfloat16 units (AVX-512 BF16 or AMX, read from its flags by model/precision.py), the whole backbone
in bfloat16 or only its linear maps with float32 activations between them. On CUDA: the same passes
replayed from CUDA graphs over bucketed shapes (model/cuda_graphs.py; SDPA attention only). Each is timed
at batch 1 and at the largest batch (CLLM4REC_MAX_BATCH_SIZE prompts). Of PyTorch's float32 and the formats
whose top 20 items agree with its top 20 on at least MIN_TOP20_OVERLAP of sample prompts (the checkpoint's
own users, prompts as served, in batches of every size up to the largest), the fastest at batch 1 stays;
where another is faster at the largest batch and the two can run side by side (one in ONNX Runtime, the
other PyTorch's), that one takes the batches from the size where it gets faster (the 4-layer quickstart
model: ONNX Runtime's float32 alone, then PyTorch's bfloat16, docs/benchmarks.md). A format not kept comes
off exactly, so PyTorch's float32 backbone comes back as it was. On a CPU without the units
bfloat16 is emulated, about ten times slower (docs/benchmarks.md), so it is not tried. The user and item
tables and the item head stay float32 and PyTorch's either way: the head always computes in float32
(CLLM4Rec.item_logits), and the tables are per-user memory that CLLM4REC_DTYPE=bfloat16 halves when
asked for explicitly. Measured choices: docs/benchmarks.md ("Precision of the served model").

CLLM4REC_BACKBONE_FORMAT pins the format instead (pin_backbone_format), written as the choice names it
(PrecisionChoice.precision): nothing is timed, so every replica serves the same format, where replicas
measuring on their own can choose differently when two formats time close.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from model.checkpoint import Recommender
from model.config import ConfigError
from model.cllm4rec import EVERY_BATCH_SIZE, CLLM4Rec, score_prompts
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
# Passes of the largest batch (up to CLLM4REC_MAX_BATCH_SIZE sample prompts) timed per format, after one: each
# takes 10-40x a batch-1 pass, and the formats it separates are further apart (4 layers: 74 against 109 ms).
LARGEST_BATCH_REPEATS = 3
# Formats that run the backbone in another engine (CLLM4Rec.inference_backbone) rather than change PyTorch's:
# one of them and one PyTorch format can serve side by side, each the batch sizes it is faster at.
RUNNER_FORMATS = ONNXRUNTIME_FORMATS + CUDA_GRAPH_FORMATS


FORMATS = ("float32",) + ONNXRUNTIME_FORMATS + BFLOAT16_FORMATS + CUDA_GRAPH_FORMATS


@dataclass
class PrecisionChoice:
    # The backbone's format: "float32" (PyTorch), one of the *_FORMATS, or "SMALL+LARGE@N": SMALL for batches of
    # fewer than N (from_batch) prompts, LARGE from there on; what CLLM4REC_BACKBONE_FORMAT takes to pin it
    precision: str
    reason: str  # one line for the log
    batch1_ms: dict[str, float] = field(default_factory=dict)  # median forward time of float32 and each format
    # that ranks as it does (the others are not timed)
    top20_overlap: dict[str, float] = field(default_factory=dict)  # each other format's agreement with float32
    largest_batch_ms: dict[str, float] = field(default_factory=dict)  # median time of the largest batch's pass
    from_batch: int | None = None  # where a split precision's second format takes over


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
    but the word embeddings (buffers such as the rotary frequencies stay float32: the attention casts its
    rotation to the activations' format), whose lookups are cast to bfloat16 on their way into the blocks
    instead (the same numbers; the table stays float32 for ONNX Runtime beside it), "bfloat16-linear"
    swaps the blocks' linear maps for Bfloat16Linear, "float32-onnxruntime" runs the float32 backbone
    through ONNX Runtime (model/onnx_backbone.py), and "float32-cuda-graphs" replays its passes from CUDA
    graphs (model/cuda_graphs.py) for batches of up to max_batch_size prompts."""

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
        self.cast_on_entry: RemovableHandle | None = None  # "bfloat16": the embeddings' cast into the blocks

    def put_on(self) -> None:
        if self.name == "bfloat16":
            word_embeddings = self.model.backbone.get_input_embeddings().weight
            for p in self.parameters:
                if p is not word_embeddings:
                    p.data = p.data.to(torch.bfloat16)
            self.cast_on_entry = self.model.backbone.base_model.register_forward_pre_hook(
                bfloat16_embeddings, with_kwargs=True)
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
        if self.cast_on_entry is not None:
            self.cast_on_entry.remove()
            self.cast_on_entry = None
        self.model.inference_backbone = None
        self.model.inference_batch_sizes = EVERY_BATCH_SIZE


def bfloat16_embeddings(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A forward pre-hook of the backbone's blocks: their float32 input embeddings in bfloat16."""
    embeddings = kwargs.get("inputs_embeds")
    return args, kwargs if embeddings is None else {**kwargs, "inputs_embeds": embeddings.to(torch.bfloat16)}


def sample_prompts(recommender: Recommender, n: int) -> list[list[int]]:
    """Served prompts of the checkpoint's first n users with training items."""
    train = recommender.checkpoint.split.train
    users = [u for u, items in enumerate(train) if len(items)][:n]
    return [build_recommend_prompt(recommender.space, u, train[u].tolist(), recommender.max_history) for u in users]


def median_ms(recommender: Recommender, prompts: list[list[int]], warm_ups: int = WARM_UP_PASSES,
              repeats: int = TIMING_REPEATS) -> float:
    """The median time of a pass over these prompts until its scores can be read (a GPU's work included)."""
    for _ in range(warm_ups):  # the first passes of a format pay for its kernels' set-up
        score_prompts(recommender.model, prompts)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        score_prompts(recommender.model, prompts)[0, 0].item()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def takeover_batch(small: dict[int, float], large: dict[int, float]) -> int:
    """The smallest batch size timed (in both: size -> ms) at which `large` is faster than `small`."""
    return min(size for size in small if large[size] < small[size])


def time_sizes(recommender: Recommender, prompts: list[list[int]], sizes: list[int]) -> dict[int, float]:
    """Batch size -> the median ms of a pass of the first that many prompts in the format that is on: batch 1
    with median_ms's defaults, larger batches LARGEST_BATCH_REPEATS times after one."""
    return {size: median_ms(recommender, prompts[:1]) if size == 1 else
            median_ms(recommender, prompts[:size], 1, LARGEST_BATCH_REPEATS) for size in sizes}


def can_share(first: str, second: str) -> bool:
    """Two formats serve side by side when one runs in another engine and the other is PyTorch's, and that
    engine keeps its own weights (ONNX Runtime) or PyTorch's stay as they are (float32): CUDA graphs read
    PyTorch's weights in place, which a bfloat16 format would replace."""
    runners = [name for name in (first, second) if name in RUNNER_FORMATS]
    if len(runners) != 1:
        return False
    other = second if runners[0] == first else first
    return runners[0] in ONNXRUNTIME_FORMATS or other == "float32"


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


def parse_backbone_format(spec: str) -> tuple[str, str | None, int | None]:
    """A format as PrecisionChoice.precision names it -> (small batches' format, large batches' format or None,
    the batch size where the large one takes over or None). Raises ValueError saying what is wrong."""
    names, _, takeover = spec.partition("@")
    small, _, large = names.partition("+")
    for name in filter(None, (small, large)):
        if name not in FORMATS:
            raise ValueError(f"unknown backbone format {name!r}: one of {', '.join(FORMATS)}, or SMALL+LARGE@N")
    if not large:
        if takeover:
            raise ValueError(f"{spec!r}: @N goes with two formats, SMALL+LARGE@N")
        return small, None, None
    if not takeover.isdigit() or int(takeover) < 2:
        raise ValueError(f"{spec!r}: two formats need the batch size where the second takes over, at least 2 "
                         "(SMALL+LARGE@N)")
    if small == large:
        raise ValueError(f"{spec!r}: two different formats, or one alone")
    return small, large, int(takeover)


def serve_formats(formats: dict[str, BackboneFormat], small: str, large: str | None = None,
                  from_batch: int | None = None) -> None:
    """Put the chosen format on, or two: `small` for batches of fewer than from_batch prompts, `large` from
    there on (one of them runs in another engine, whose batch sizes the model is told). The engine's first:
    it exports the float32 backbone, which a bfloat16 format would change."""
    for name in sorted((small, large), key=lambda name: name not in RUNNER_FORMATS):
        if name in formats:
            formats[name].put_on()
    if large is not None:
        model = formats[small if small in formats else large].model
        model.inference_batch_sizes = range(1, from_batch) if small in RUNNER_FORMATS else \
            range(from_batch, EVERY_BATCH_SIZE.stop)


def pin_backbone_format(recommender: Recommender, spec: str, max_batch_size: int,
                        spinning: bool = False) -> PrecisionChoice:
    """Serve the format CLLM4REC_BACKBONE_FORMAT names, untimed, so that every replica serves the same one (and
    the benchmarks compare a server with a bare pass in one format). Its top 20 is still compared with
    float32's, and the log warns where it shares less than MIN_TOP20_OVERLAP. Raises ConfigError where the
    format is unknown, not available on this device (bfloat16 without bfloat16 units, CUDA graphs off CUDA)
    or cannot be put on."""
    try:
        small, large, from_batch = parse_backbone_format(spec)
    except ValueError as e:
        raise ConfigError(f"CLLM4REC_BACKBONE_FORMAT: {e}") from None
    names = [name for name in (small, large) if name is not None]
    available = ("float32",) + candidate_formats(recommender.model)
    for name in names:
        if name not in available:
            raise ConfigError(f"CLLM4REC_BACKBONE_FORMAT={spec}: {name} is not available on this "
                              f"{recommender.device.type} (available: {', '.join(available)})")
    if large is not None and not can_share(small, large):
        raise ConfigError(f"CLLM4REC_BACKBONE_FORMAT={spec}: {small} and {large} cannot serve side by side (one "
                          f"must run in another engine: {', '.join(RUNNER_FORMATS)})")
    prompts = sample_prompts(recommender, SAMPLE_PROMPTS)
    reference = score_in_batches(recommender.model, prompts, max_batch_size) if prompts else None
    formats = {name: BackboneFormat(recommender, name, max_batch_size, spinning) for name in names if name != "float32"}
    try:
        serve_formats(formats, small, large, from_batch)
    except Exception as e:
        for backbone_format in formats.values():
            backbone_format.take_off()
        raise ConfigError(f"CLLM4REC_BACKBONE_FORMAT={spec}: the format could not be put on ({e!r})") from e
    overlap = top20_overlap(reference, score_in_batches(recommender.model, prompts, max_batch_size)) \
        if reference is not None else None
    if overlap is not None and overlap < MIN_TOP20_OVERLAP:
        log.warning("CLLM4REC_BACKBONE_FORMAT=%s shares %.3f of float32's top 20, below the %.2f a measured choice "
                    "asks for", spec, overlap, MIN_TOP20_OVERLAP)
    shared = f"; top 20 shared {overlap:.3f}" if overlap is not None else ""
    return PrecisionChoice(spec, f"{spec} backbone, set by CLLM4REC_BACKBONE_FORMAT{shared}",
                           top20_overlap={spec: overlap} if overlap is not None else {}, from_batch=from_batch)


def choose_backbone_format(recommender: Recommender, max_batch_size: int, spinning: bool = False) -> PrecisionChoice:
    """Leave the recommender's float32 backbone in the fastest format whose rankings agree (see above);
    max_batch_size: the largest batch it will be asked to score (CLLM4REC_MAX_BATCH_SIZE); spinning: ONNX
    Runtime's threads spin (CLLM4REC_ONNXRUNTIME_SPINNING)."""
    on_cuda = recommender.device.type == "cuda"
    prompts = sample_prompts(recommender, SAMPLE_PROMPTS)
    if not prompts:
        return PrecisionChoice("float32", "no training users to compare the formats on")
    reference = score_in_batches(recommender.model, prompts, max_batch_size)
    largest = len(prompts[:max_batch_size])
    ends = sorted({1, largest})  # the batch sizes every format that may be kept is timed at
    timings, overlaps, failed = {"float32": time_sizes(recommender, prompts, ends)}, {}, []
    formats = {}
    for name in candidate_formats(recommender.model):
        backbone_format = BackboneFormat(recommender, name, max_batch_size, spinning)
        try:
            backbone_format.put_on()
            overlaps[name] = top20_overlap(reference, score_in_batches(recommender.model, prompts, max_batch_size))
            if overlaps[name] >= MIN_TOP20_OVERLAP:  # only a format that may be kept is timed (seconds at 30 layers)
                timings[name] = time_sizes(recommender, prompts, ends)
        except Exception as e:  # a backbone the exporter or a capture cannot take: not a candidate
            log.warning("backbone format %s unavailable: %r", name, e)
            failed.append(name)
            overlaps.pop(name, None)
            continue
        finally:
            backbone_format.take_off()
        formats[name] = backbone_format
    shown = "; ".join(f"batch-{size} forward " + ", ".join(f"{timings[name][size]:.1f} ms {name}" for name in timings)
                      for size in ends) \
        + "; top 20 shared " + ", ".join(f"{overlaps[name]:.3f} {name}" for name in overlaps) \
        + ("; float32 weights computing in bfloat16 (autocast)" if on_cuda else
           "" if cpu_has_bf16_units() else f"; no bfloat16 units ({' or '.join(BF16_CPU_FLAGS)})") \
        + "".join(f"; {name} failed" for name in failed)
    batch1_ms = {name: timing[1] for name, timing in timings.items()}
    largest_batch_ms = {name: timing[largest] for name, timing in timings.items()} if largest > 1 else {}
    # PyTorch's float32 and each format that ranks as it does; the fastest at batch 1 serves the small batches
    # (a lone request's latency), the fastest at the largest batch the large ones, where the two can share.
    kept = list(timings)
    small = min(kept, key=batch1_ms.get)
    large = min(kept, key=largest_batch_ms.get) if largest_batch_ms else small
    if largest_batch_ms and largest_batch_ms[large] >= largest_batch_ms[small]:  # a tie: no reason to switch
        large = small
    if large == small or not can_share(small, large):
        if small == "float32":
            return PrecisionChoice("float32", "float32 backbone, the others were slower or ranked differently "
                                   f"({shown})", batch1_ms, overlaps, largest_batch_ms)
        serve_formats(formats, small)
        return PrecisionChoice(small, f"{small} backbone ({shown})", batch1_ms, overlaps, largest_batch_ms)
    # Where between the two the large batches' format takes over: timed at the batch buckets in between (a
    # format's time is not linear in the batch: bfloat16 gains the most from larger ones).
    between = [size for size in batch_buckets(largest) if 1 < size < largest]
    for name in (small, large):
        if name in formats:
            formats[name].put_on()
        try:
            timings[name].update(time_sizes(recommender, prompts, between))
        finally:
            if name in formats:
                formats[name].take_off()
    from_batch = takeover_batch(timings[small], timings[large])
    serve_formats(formats, small, large, from_batch)
    return PrecisionChoice(f"{small}+{large}@{from_batch}", f"{small} backbone for batches of up to "
                           f"{from_batch - 1} prompts, {large} from {from_batch} ({shown})", batch1_ms, overlaps,
                           largest_batch_ms, from_batch)
