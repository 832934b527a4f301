"""Optimisers of the soft tokens and the finetuning learning-rate schedule.

Adam, lazily (SparseAdam) for tables that are only looked up: a step updates the rows in its batch,
so it costs the same for 1k or 1M users. The collaborative item table is also the item head, where
every row gets a gradient: dense (fused) Adam, with the head's bias and scale.

Weight decay is decoupled (AdamW's form, w -= lr * decay * w) and applies to the soft-token rows a
step trains: all item rows (the head touches them all), the batch's user rows; never the head's bias
and scale.
"""

from __future__ import annotations

import math

import torch


def make_optimizers(tables, lr: float, head: list[torch.nn.Parameter] = (), weight_decay: float = 0.0
                    ) -> list[torch.optim.Optimizer]:
    """Adam for the tables of one view (and the item head's parameters with the collaborative view)."""
    sparse = [t.weight for t in tables if t.sparse]
    dense = [t.weight for t in tables if not t.sparse]
    optimizers: list[torch.optim.Optimizer] = []
    if sparse:
        optimizers.append(torch.optim.SparseAdam(sparse, lr=lr))
    groups = [{"params": dense, "weight_decay": weight_decay}] if dense else []
    if head:
        groups.append({"params": list(head), "weight_decay": 0.0})
    if groups:
        optimizers.append(torch.optim.AdamW(groups, lr=lr, fused=True))
    return optimizers


def decay_rows(rows, lr: float, weight_decay: float) -> None:
    """Decoupled weight decay of the rows a SparseAdam step trained: rows is [(table, row indices)]."""
    if weight_decay <= 0:
        return
    with torch.no_grad():
        for table, index in rows:
            if len(index):
                table.weight[index] *= 1 - lr * weight_decay


def set_lr(optimizers, lr: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr


def scheduled_lr(base: float, schedule: str, step: int, warmup_steps: int, progress: float, floor: float) -> float:
    """The finetuning lr at a step: linear warm-up over warmup_steps, then constant or cosine decay from
    base to floor x base as progress (the share of finetuning done, by epochs or by time) goes 0 -> 1."""
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    if schedule == "constant":
        return base
    progress = min(max(progress, 0.0), 1.0)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"{index}.{key}"] = torch.as_tensor(value)
    return tensors


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        if key == "step" and value.dtype == torch.int64:
            # SparseAdam counts steps in a Python int (saved as an int64 tensor): a tensor would turn its
            # bias correction into float32 arithmetic, and a resumed run would drift from an unbroken one.
            value = int(value)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
