"""Multi-process training with PyTorch DDP, started by ``torchrun`` (NCCL on GPUs, gloo on CPUs).

``torchrun --nproc_per_node N -m Training train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; every
process builds the same network from the same seed, draws its own batches (the rank is part of
each batch's seed) and DDP averages the gradients. Rank 0 validates, writes checkpoints and logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: torch.device) -> Optional[DistInfo]:
    """Join the process group when WORLD_SIZE > 1 is set (torchrun); returns None for a single process."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def mean_across(value: float, info: Optional[DistInfo], device: torch.device) -> float:
    """The mean of ``value`` over all processes (``value`` itself without DDP)."""
    if info is None:
        return value
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def barrier(info: Optional[DistInfo]) -> None:
    if info is not None:
        import torch.distributed as dist

        dist.barrier()

