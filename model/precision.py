"""Where the backbone computes in bfloat16: autocast for training.

bfloat16 halves the bytes a matrix product reads and, on hardware with bf16 units, doubles or more
its arithmetic rate: every CUDA GPU this project runs on, and CPUs with AVX-512 BF16 or AMX (read
from the CPU's flags, not guessed from its name). A CPU without them emulates bf16, about ten times
slower than float32. "auto" is bf16 on CUDA only: on a CPU with the units, the recommendation pass
of the cpu recipe (4 layers, short prompts) measured no faster in bf16 (docs/training.md), so a
CPU run asks for it with "bf16" (at full depth it gained 24% there). The item head always computes
in float32 (CLLM4Rec.item_logits): validation, the best-epoch choice and served rankings read its
scores.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

AUTOCAST_MODES = ("auto", "off", "bf16")
# CPU flags (Linux /proc/cpuinfo) of native bfloat16 arithmetic: AVX-512 BF16 (Cooper Lake, Zen 4 and
# later) and AMX (Sapphire Rapids and later).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_has_bf16_units() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: no way to read the flags, so no bf16
        return False
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def autocast_dtype(device: torch.device, mode: str) -> torch.dtype | None:
    """bfloat16 or None (float32) for a device: "bf16" always, "off" never, "auto" on CUDA."""
    if mode not in AUTOCAST_MODES:
        raise ValueError(f"autocast must be one of {', '.join(AUTOCAST_MODES)}, not {mode!r}")
    if mode == "bf16" or (mode == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def slow_bf16_note(device: torch.device, dtype: torch.dtype | None) -> str | None:
    """A warning when bf16 is asked for on a CPU that emulates it."""
    if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_bf16_units():
        return (f"note: this CPU has no bf16 units ({' or '.join(BF16_CPU_FLAGS)}): bf16 is emulated, about "
                "10x slower than float32 (--autocast off)")
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The autocast context of a forward pass: dtype None is float32 (autocast off)."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
