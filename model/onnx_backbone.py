"""The frozen backbone run by ONNX Runtime: the same float32 computation, fewer milliseconds on a CPU.

The backbone never trains, so its passes without gradients may run through another engine: serving's
(where service/precision.py measures it faster), and training's validation and refit and `cllm4rec
evaluate` on a CPU (use_engine). The backbone (its kept layers, with any adapters) is exported once to
ONNX through a temporary file and run by ONNX Runtime's CPU provider, which fuses the blocks' operations;
the soft tokens' embedding before it and the item head after it stay PyTorch (CLLM4Rec.embed,
item_logits), so prompts, tables, live items and the float32 head are exactly the trainer's. The export
is torch.export's (dynamo=True; batch and prompt length symbolic), at ONNX opset 23 where attention, RMS
norms and rotary embeddings are one operator each, and each node costs its dispatch (SmolLM2's 30 layers:
1,700 nodes after ONNX Runtime's own optimisation as Hugging Face writes the blocks, 951 with the norms,
rotations and products rewritten, 3,318 from the TorchScript exporter). A batch-1 forward of the 30 layers
on an AVX-512 BF16 CPU: 27.8 ms against the TorchScript graph's 30.0 ms and PyTorch's 70 ms, and 12-19%
less since on an AVX2 one with the rewrites of model/onnx_export.py (docs/benchmarks.md, "The backbone
exported by torch.export" and "One operator a norm, a rotation and an attention"). model/onnx_export.py
writes the graph, tracing two blocks and repeating the second for the rest; the session is checked against
PyTorch on a padded batch before it is used, and an assembled graph that fails the check is traced whole
instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from torch import nn

from model.backbone import BackboneOutput, ExportedBackbone
from model.onnx_export import export_backbone, probe_batch, relative_error

ENGINES = ("auto", "pytorch", "onnxruntime")  # what runs passes without gradients (use_engine)
EXPORTER_LOGGERS = ("torch.onnx", "onnx_ir", "onnxscript")
# How far each state vector of the session may be from PyTorch's float32 one, relative to its length.
# Per vector, not per element: SmolLM2's states carry a few channels of 10^4 beside channels near 0, and
# float32 rounding in those large channels moves every other one through the norms and the attention
# (per element 3.8x over 1e-3 on an AVX-512 BF16 CPU, per vector 9e-5 to 2e-4 at 30 layers). A graph
# put together wrongly (a block with another's weights) is off by the order of the states themselves.
MATCH_TOLERANCE = 1e-3


class OnnxExportError(RuntimeError):
    """The exported backbone does not compute what PyTorch does."""


class OnnxBackbone:
    """Runs the exported backbone; called like CLLM4Rec.backbone_output's backbone pass (no gradients)."""

    def __init__(self, backbone: nn.Module, every_layer: bool, threads: int, spinning: bool = False):
        self.every_layer = every_layer
        with tempfile.TemporaryDirectory() as directory:
            # Through a file rather than bytes in memory: the session then takes 0.4 GB less at 30 layers.
            graph = Path(directory) / "backbone.onnx"
            for repeat_blocks in (True, False):  # an assembled graph that does not match: traced whole
                with quiet_exporter():
                    # Whether the later blocks were repeated from the second rather than traced.
                    self.assembled = export_backbone(backbone, every_layer, graph, repeat_blocks)
                release_freed_memory()  # what the export allocated and freed: 0.4 GB more at 30 layers
                self.session = self.open_session(graph, threads, spinning)
                if self.matches(backbone):
                    break
                if not self.assembled:
                    raise OnnxExportError("the exported backbone's outputs differ from PyTorch's")
        release_freed_memory()

    @classmethod
    def of(cls, model: nn.Module, spinning: bool = False) -> OnnxBackbone:
        """For a CLLM4Rec: every layer's states where its head reads them, torch's thread count."""
        return cls(model.backbone, model.has_head_readout, torch.get_num_threads(), spinning)

    @staticmethod
    def open_session(graph: Path, threads: int, spinning: bool = False) -> onnxruntime.InferenceSession:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # No spinning unless asked (CLLM4REC_ONNXRUNTIME_SPINNING): the event loop and Redis client share the
        # same cores (as torch's OMP_WAIT_POLICY=PASSIVE, service/__init__.py). Spinning measured 10% faster at
        # 30 layers and 4 layers on an otherwise idle machine, at the cost of a busy core (docs/benchmarks.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        return onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])

    def matches(self, backbone: nn.Module) -> bool:
        """Whether the session gives PyTorch's outputs (to float32 rounding over the blocks) at the real
        positions of a padded batch of random embeddings."""
        embeds, mask = probe_batch(backbone)
        with torch.no_grad():
            expected = ExportedBackbone(backbone, self.every_layer).eval()(embeds, mask)
        expected = expected if isinstance(expected, tuple) else (expected,)
        outputs = self.session.run(None, {"inputs_embeds": embeds.numpy(), "attention_mask": mask.numpy()})
        real = mask.bool()
        return all(relative_error(torch.from_numpy(out)[..., real, :], want[..., real, :]) <= MATCH_TOLERANCE
                   for out, want in zip(outputs, expected))

    def __call__(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> BackboneOutput:
        outputs = self.session.run(None, {"inputs_embeds": inputs_embeds.detach().float().numpy(),
                                          "attention_mask": attention_mask.numpy().astype(np.int64)})
        return BackboneOutput.of(inputs_embeds, *(torch.from_numpy(output) for output in outputs))


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Only the exporter's errors in the log: torch.onnx warns of each optional package it finds missing
    (torchvision's operators, nothing a backbone uses) and the graph passes log each step at INFO."""
    loggers = [logging.getLogger(name) for name in EXPORTER_LOGGERS]
    levels = [exporter_log.level for exporter_log in loggers]
    for exporter_log in loggers:
        exporter_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for exporter_log, level in zip(loggers, levels):
            exporter_log.setLevel(level)


def release_freed_memory() -> None:
    """Hand the memory the C allocator holds free back to the system (glibc's malloc_trim; elsewhere a
    no-op): the export frees hundreds of MB that would otherwise stay in the server's resident size."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def use_engine(model: nn.Module, engine: str, device: torch.device) -> str | None:
    """Run the model's passes without gradients (validation, the refit, evaluation) through `engine`:
    "onnxruntime", "pytorch", or "auto": ONNX Runtime on a CPU for a backbone that does not train (no
    adapters). Returns a line for the log, or None where PyTorch runs them. An export that fails leaves
    PyTorch's (and says why)."""
    if engine not in ENGINES:
        raise ValueError(f"the inference engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == "pytorch" or (engine == "auto" and (device.type != "cpu" or model.adapters)):
        return None
    if device.type != "cpu":
        return f"note: passes without gradients stay PyTorch's: ONNX Runtime runs on the CPU, the model on {device}"
    try:
        model.inference_backbone = OnnxBackbone.of(model)
    except Exception as e:  # a backbone the exporter cannot take
        return f"note: passes without gradients stay PyTorch's: the ONNX export failed ({e!r})"
    return "passes without gradients (validation, refit, evaluation) through ONNX Runtime (--inference-engine)"
