"""The memory a run needs before it allocates, and the one-line refusal when the device has less free."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import LoopConfig
from .errors import TrainingError
from .plan import MemberPlan


def estimate_memory(plans: list[MemberPlan], loop: LoopConfig, reader_bytes: int = 0) -> int:
    """Bytes the loop needs before it allocates: per member weights + gradients + Adam's two moments (4 fp32
    copies of 2*F*D + 2*F + D), the largest member's activations (~8 [B, F] fp32 tensors live at once in the
    forward/backward: pre-activations, masks, latents and their gradients), the batch, and the reader's buffers."""
    params = sum(2 * p.sae_cfg.d_sae * p.sae_cfg.d_in + 2 * p.sae_cfg.d_sae + p.sae_cfg.d_in for p in plans)
    acts = max(8 * loop.batch_size * p.sae_cfg.d_sae + 4 * loop.batch_size * p.sae_cfg.d_in for p in plans)
    return 4 * (4 * params + acts) + reader_bytes


def available_memory(device: torch.device) -> int | None:
    """Free bytes on the device (CUDA: mem_get_info; CPU: MemAvailable of /proc/meminfo), None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(
    plans: list[MemberPlan], loop: LoopConfig, device: torch.device, reader_bytes: int = 0
) -> int:
    """TrainingError (one line, with the fix) when the estimate exceeds 90 % of the free memory."""
    need, free = estimate_memory(plans, loop, reader_bytes), available_memory(device)
    if free is not None and need > 0.9 * free:
        widest = max(plans, key=lambda p: p.sae_cfg.d_sae)
        raise TrainingError(
            f"training needs about {need / 2**30:.1f} GiB ({len(plans)} SAE(s), widest {widest.sae_cfg.d_sae} latents, "
            f"batch {loop.batch_size}) but {device.type} has {free / 2**30:.1f} GiB free; lower --width or --batch-size"
        )
    return need
