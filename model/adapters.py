"""Low-rank adapters (LoRA; Hu et al., ICLR 2022) on the last transformer blocks of the frozen backbone.

    y = W x + up (down x)        W frozen; down [r, in], up [out, r] trained, up = 0 at the start

Not in the paper, whose backbone is frozen throughout: a frozen word LM's attention pools a prompt's
item tokens the way it pools words, and the soft tokens alone cannot change how. An adapter of rank r
on every linear map of the last blocks lets the collaborative view reshape that pooling at a small
cost (r x (in + out) parameters per map). Starting with up = 0 makes the adapted backbone start as the
frozen one, so the recipe's other levers begin where they did without it.

Written here rather than taken from PEFT: thirty lines, and a checkpoint then holds plain named
tensors that serving loads with the rest (model/checkpoint.py), with no other library's format.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model.backbone import decoder_layers


class LowRankAdapter(nn.Module):
    """A frozen linear map plus a trained rank-r update (zero at the start)."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        self.down = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype,
                                             device=base.weight.device))
        self.up = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype,
                                           device=base.weight.device))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))  # nn.Linear's own initialisation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.down.T.to(x.dtype)) @ self.up.T.to(x.dtype)


ADAPTER_TARGETS = ("all", "attention")


def attach_adapters(backbone: nn.Module, rank: int, n_layers: int, targets: str = "all") -> dict[str, LowRankAdapter]:
    """Wrap the nn.Linear maps of the last n_layers blocks (all blocks if fewer) in LowRankAdapters:
    every one (targets "all"), or the attention's alone ("attention": the maps under a module whose
    name has "attn", which is how Llama-family and most other Hugging Face blocks name it).

    Returns them by a stable name (block index and module path), the names their tensors are saved under."""
    layers = decoder_layers(backbone)
    adapters: dict[str, LowRankAdapter] = {}
    for index in range(max(len(layers) - n_layers, 0), len(layers)):
        block = layers[index]
        linears = [(path, module) for path, module in block.named_modules() if isinstance(module, nn.Linear)
                   and (targets == "all" or "attn" in path)]
        for path, module in linears:
            parent_path, _, attribute = path.rpartition(".")
            parent = block.get_submodule(parent_path) if parent_path else block
            adapter = LowRankAdapter(module, rank)
            setattr(parent, attribute, adapter)
            adapters[f"{index}.{path}"] = adapter
    if not adapters:
        raise ValueError(f"no nn.Linear {'' if targets == 'all' else 'attention '}maps in the backbone's blocks to "
                         f"adapt ({type(backbone).__name__}); use a backbone built of nn.Linear (Llama family) or "
                         "--adapter-rank 0")
    return adapters


def adapter_tensors(adapters: dict[str, LowRankAdapter]) -> dict[str, torch.Tensor]:
    """The trained tensors by checkpoint name: adapter.<block>.<path>.down / .up."""
    return {f"adapter.{name}.{part}": getattr(adapter, part).detach().float().cpu()
            for name, adapter in adapters.items() for part in ("down", "up")}


def load_adapter_tensors(adapters: dict[str, LowRankAdapter], tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, adapter in adapters.items():
            for part in ("down", "up"):
                getattr(adapter, part).copy_(tensors[f"adapter.{name}.{part}"])
