"""Data parallelism over torch.distributed, launched by torchrun:

    torchrun --standalone --nproc-per-node N $(command -v cllm4rec) train ...

Every rank builds the same epoch (same seed, same batches of `batch_size x world` examples) and takes
its share of each batch, so N ranks of batch B take the steps one process of batch N x B would.
A rank's loss is divided by the whole step's target and document counts (one all-reduce of three
numbers per step) and the ranks' gradients are summed, which is the gradient of the single-process
loss over the union of their shares; every rank then takes the same Adam step and the tables stay
equal without being sent around. Dense gradients (the item head, the adapters) are all-reduced; the
user tables' sparse gradients are all-gathered as (row, value) pairs and summed, so a step still
moves only the rows in it, with NCCL (which reduces no sparse tensors) as with gloo.

Why not DistributedDataParallel: its reducer averages dense gradients of a module's forward() and
takes sparse ones only with gloo; the trainer calls the model's stage losses, not forward(), and its
tables are sparse. The collectives are torch.distributed's own.

The same all-reduce carries each rank's stop vote (time budget, Ctrl-C, SIGTERM), so all ranks end
the same step. Rank 0 alone validates, writes checkpoints, metrics and progress, and broadcasts the
validation result, from which every rank takes the same early-stopping decision.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

# How long a rank waits in a collective for the others: rank 0's validation of an epoch is the
# longest wait (a few minutes on a CPU for thousands of users).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: rank among world processes (1: no torch.distributed at all)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1

    def device(self, device: torch.device) -> torch.device:
        """The rank's own GPU on a machine with several (torchrun's LOCAL_RANK)."""
        if device.type == "cuda" and self.parallel and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device


def launched_world() -> int:
    """How many ranks torchrun started (1: not under torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start(device_type: str) -> Ranks:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs); one rank when not under torchrun."""
    if launched_world() <= 1:
        return Ranks()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank)


def stop(ranks: Ranks) -> None:
    """Leave the group together: no rank exits (and no launcher moves the output directory) while
    rank 0 is still writing the last checkpoint."""
    if ranks.parallel and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def leave(code: int) -> None:
    """End a torchrun rank's process now, after its work (stop() done, files closed): the interpreter's
    own teardown then destroys gloo's objects while its threads may still run, which aborted a finished
    rank with "terminate called without an active exception" about once in twenty test runs (and
    torchrun then reports the whole job failed). A single process returns and exits normally."""
    if launched_world() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def share(index: np.ndarray, ranks: Ranks) -> np.ndarray:
    """This rank's part of one step's examples (contiguous, sizes differing by at most one)."""
    return np.array_split(index, ranks.world)[ranks.rank]


def sum_across(values: Iterable[float], ranks: Ranks, device: torch.device) -> list[float]:
    """The element-wise sum over ranks of a few numbers (counts, stop votes): one all-reduce."""
    values = list(values)
    if not ranks.parallel:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def sum_gradients(optimizers: Iterable[torch.optim.Optimizer], ranks: Ranks) -> None:
    """Replace the gradient of each parameter the optimizers step by its sum over ranks; a rank without
    one (its share of the step was empty) adds zero. SparseAdam's parameters (the looked-up tables)
    have row-sparse gradients."""
    if not ranks.parallel:
        return
    optimizers = list(optimizers)
    dense = [p for o in optimizers if not isinstance(o, torch.optim.SparseAdam)
             for g in o.param_groups for p in g["params"]]
    sparse = [p for o in optimizers if isinstance(o, torch.optim.SparseAdam)
              for g in o.param_groups for p in g["params"]]
    for p in dense:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
    for p in sparse:
        grad = p.grad if p.grad is not None else torch.sparse_coo_tensor(
            torch.zeros((1, 0), dtype=torch.long, device=p.device), p.new_zeros((0, *p.shape[1:])), p.shape,
            check_invariants=False)
        p.grad = _sum_sparse(grad.coalesce(), ranks)


def _sum_sparse(grad: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """A table's row-sparse gradients summed over ranks: gather every rank's (rows, values), add up."""
    rows, values = grad.indices()[0], grad.values()
    sizes = [torch.zeros((), dtype=torch.long, device=rows.device) for _ in range(ranks.world)]
    dist.all_gather(sizes, torch.tensor(len(rows), device=rows.device))
    longest = int(max(sizes))
    padded_rows = torch.zeros(longest, dtype=rows.dtype, device=rows.device)
    padded_values = values.new_zeros((longest, *values.shape[1:]))
    padded_rows[: len(rows)], padded_values[: len(rows)] = rows, values
    all_rows = [torch.empty_like(padded_rows) for _ in range(ranks.world)]
    all_values = [torch.empty_like(padded_values) for _ in range(ranks.world)]
    dist.all_gather(all_rows, padded_rows)
    dist.all_gather(all_values, padded_values)
    rows = torch.cat([r[: int(n)] for r, n in zip(all_rows, sizes)])
    values = torch.cat([v[: int(n)] for v, n in zip(all_values, sizes)])
    # Rows from torch's own gradients are valid by construction: no invariant checks (their cost, their warning).
    return torch.sparse_coo_tensor(rows[None], values, grad.shape, check_invariants=False).coalesce()


def broadcast_parameters(parameters: Iterable[torch.Tensor], ranks: Ranks) -> None:
    """Rank 0's values everywhere (after initialisation or --resume, so all ranks start equal)."""
    if ranks.parallel:
        for p in parameters:
            dist.broadcast(p.data, src=0)


def broadcast_object(value, ranks: Ranks):
    """Rank 0's value (validation metrics, their timing) on every rank."""
    if not ranks.parallel:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
