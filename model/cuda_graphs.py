"""The frozen backbone replayed from CUDA graphs: a pass is one launch instead of hundreds of kernels.

On a GPU a batch-1 pass of SmolLM2's 30 layers is bound by launching its kernels one after another from
Python (25 ms p50 over HTTP on an H200, where the arithmetic takes well under a millisecond;
docs/benchmarks.md). A CUDA graph records the kernels of a pass once and replays them with one launch,
on fixed shapes and fixed memory. Hence:

- Buckets: one graph per (batch, length): batch sizes the powers of two up to the server's largest
  batch (and that batch), lengths the multiples of LENGTH_STEP up to the longest prompt the checkpoint
  builds. A pass runs in the smallest bucket that holds it: its prompts fill a corner of the bucket's
  fixed inputs, and what lies beyond (extra rows, positions after every prompt's end) never reaches a
  real position's state, as causal attention reads no later position. A pass larger than every
  bucket runs eagerly.
- The attention mask: the 4D mask (causal and padding, True attends: transformers' SDPA mask) is made
  inside the graph from the 2D one and handed to the model as prepared. The model's own mask code
  reads the mask on the host to skip it for unpadded batches, which a capture forbids; so SDPA only.
- Precision: captured under inference_autocast's bfloat16, the eager CUDA passes' (and validation's),
  with autocast's cache of cast weights off: the casts are replayed with the graph, as tensors cached
  during a capture must not outlive it.
- When: every bucket at load, in the loading thread, with capture errors local to that thread: a
  reload captures while the old model's passes go on in the batcher's thread.
- Memory: the graphs share one pool, so together they hold about what the largest bucket's pass needs
  (each its own pool would hold the sum over all buckets). Sharing is safe here because passes run one
  at a time (the served model's lock) and each pass copies its outputs out right after its replay:
  another graph's replay may reuse a graph's memory, outputs included, but never while they are read.

The soft tokens' embedding before the backbone and the float32 item head after it stay eager
(CLLM4Rec.embed, item_logits): a few kernels each, on tables that live items grow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from model.backbone import BackboneOutput, ExportedBackbone
from model.cllm4rec import CLLM4Rec, inference_autocast

LENGTH_STEP = 16  # prompt lengths are padded to a multiple of this: a graph per multiple
WARM_UP_PASSES = 2  # eager passes on a side stream before a capture (lazy initialisation stays out of it)


def batch_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... below max_batch_size, and max_batch_size."""
    sizes = [1 << i for i in range(max_batch_size.bit_length()) if 1 << i < max_batch_size]
    return [*sizes, max_batch_size]


def length_buckets(max_tokens: int) -> list[int]:
    """The multiples of LENGTH_STEP up to the first that holds max_tokens."""
    return list(range(LENGTH_STEP, -(-max_tokens // LENGTH_STEP) * LENGTH_STEP + 1, LENGTH_STEP))


class MaskedBackbone(nn.Module):
    """ExportedBackbone with its 4D attention mask made from the 2D one within the pass (no host reads)."""

    def __init__(self, backbone: nn.Module, every_layer: bool):
        super().__init__()
        self.exported = ExportedBackbone(backbone, every_layer)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor):
        length = attention_mask.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
        return self.exported(inputs_embeds, causal[None, None] & attention_mask.bool()[:, None, None, :])


@dataclass
class Bucket:
    """A bucket's fixed inputs, and what fills its outputs from them (a graph's replay)."""

    inputs_embeds: torch.Tensor  # [batch, length, hidden], in the word embeddings' format
    attention_mask: torch.Tensor  # [batch, length]
    run: Callable[[], tuple[torch.Tensor, ...]]  # (last hidden state[, inner states]), valid until the next run


class GraphedBackbone:
    """Called like CLLM4Rec.backbone_output's backbone pass (no gradients): pads to a bucket and replays its
    graph. capture=False runs each bucket's padded pass eagerly instead: the same shapes and padding,
    what the tests check on a machine without CUDA."""

    def __init__(self, backbone: nn.Module, every_layer: bool, batch_sizes: list[int], lengths: list[int],
                 autocast: Callable[[], torch.autocast], capture: bool = True):
        self.module = MaskedBackbone(backbone, every_layer).eval()
        self.every_layer = every_layer
        self.autocast = autocast
        embeddings = backbone.get_input_embeddings().weight
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        with torch.no_grad():  # the largest first: the shared pool grows once, the others reuse it
            self.buckets = {(batch, length): self.record(batch, length, embeddings, capture)
                            for batch in sorted(batch_sizes, reverse=True) for length in sorted(lengths, reverse=True)}

    @classmethod
    def of(cls, model: CLLM4Rec, max_batch_size: int, max_tokens: int, capture: bool = True) -> GraphedBackbone:
        """For a CLLM4Rec on CUDA: every layer's states where its head reads them, its autocast without the
        weight cache, buckets up to the server's largest batch and the checkpoint's longest prompt."""
        return cls(model.backbone, model.has_head_readout, batch_buckets(max_batch_size),
                   length_buckets(max_tokens), lambda: inference_autocast(model, cache_enabled=False), capture)

    def record(self, batch: int, length: int, embeddings: torch.Tensor, capture: bool) -> Bucket:
        embeds = torch.zeros(batch, length, embeddings.shape[1], dtype=embeddings.dtype, device=embeddings.device)
        mask = torch.zeros(batch, length, dtype=torch.long, device=embeddings.device)
        mask[:, 0] = 1
        if not capture:
            def run_eagerly():
                with self.autocast():
                    return as_tuple(self.module(embeds, mask))
            return Bucket(embeds, mask, run_eagerly)
        side = torch.cuda.Stream(embeddings.device)
        side.wait_stream(torch.cuda.current_stream(embeddings.device))
        with torch.cuda.stream(side), self.autocast():
            for _ in range(WARM_UP_PASSES):
                self.module(embeds, mask)
        torch.cuda.current_stream(embeddings.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"), self.autocast():
            outputs = as_tuple(self.module(embeds, mask))

        def replay():
            graph.replay()
            return outputs
        return Bucket(embeds, mask, replay)

    def bucket_for(self, batch: int, length: int) -> Bucket | None:
        """The smallest bucket holding a pass of this shape (None: larger than all)."""
        fitting = [key for key in self.buckets if key[0] >= batch and key[1] >= length]
        return self.buckets[min(fitting)] if fitting else None

    def __call__(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> BackboneOutput:
        batch, length = attention_mask.shape
        bucket = self.bucket_for(batch, length)
        if bucket is None:
            with self.autocast():
                return BackboneOutput.of(inputs_embeds, *as_tuple(self.module(inputs_embeds, attention_mask)))
        # Only the pass's own corner is written: what an earlier pass left beyond it is never read by a real
        # position (causal attention reads no later position, rows do not mix), and every row keeps its
        # first position visible (set at record, and every prompt's), so no row's softmax is empty.
        bucket.inputs_embeds[:batch, :length] = inputs_embeds
        bucket.attention_mask[:batch, :length] = attention_mask
        outputs = bucket.run()
        # Copies: the bucket's outputs are overwritten by its next pass.
        last = outputs[0][:batch, :length].clone()
        inner = outputs[1][:, :batch, :length].clone() if self.every_layer else None
        return BackboneOutput.of(inputs_embeds, last, inner)


def as_tuple(outputs) -> tuple[torch.Tensor, ...]:
    return outputs if isinstance(outputs, tuple) else (outputs,)
