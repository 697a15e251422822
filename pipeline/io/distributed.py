"""Data-parallel calibration on torch.distributed (`torchrun --nproc-per-node N -m lpc.cli calibrate ...`).

Each rank takes every N-th sample (rank r: samples r, r+N, ...). Statistics are summed in the
single-process order, sample by sample: in round j each rank runs its j-th sample, then the ranks
broadcast their moments in rank order and every rank adds them. Sample j*N + r is thus added
exactly where one process adds it, and the artifact is byte-identical to the single-process one.
Transport is torch.distributed's (gloo on CPU, nccl on CUDA); rank 0 writes the artifact.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence, TypeVar

import torch

from lpc.pipeline.errors import InputError

log = logging.getLogger(__name__)
T = TypeVar("T")


def start(device: str = "cpu") -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); False when running alone."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
        log.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


def active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if active() else 1


def my_share(items: Sequence[T]) -> list[T]:
    """This rank's samples: items[rank::world]."""
    return list(items[rank()::world()])


def rounds(total: int) -> int:
    """Rounds needed for `total` samples over the ranks (the last may leave some ranks idle)."""
    return -(-total // world())


def broadcast_flag(value: bool | None) -> bool:
    """Rank 0's `value` on every rank (others pass None)."""
    import torch.distributed as dist

    t = torch.tensor([1 if value else 0], dtype=torch.int64, device=_comm_device())
    dist.broadcast(t, src=0)
    return bool(t.item())


def broadcast_tensors(tensors: list[torch.Tensor] | None, like: list[torch.Tensor], src: int) -> list[torch.Tensor]:
    """`tensors` of rank `src` on every rank (the others pass None; `like` gives shapes and dtypes), on the CPU."""
    import torch.distributed as dist

    dev = _comm_device()
    bufs = [t.to(dev) for t in tensors] if rank() == src else [torch.empty_like(t, device=dev) for t in like]
    for b in bufs:
        dist.broadcast(b, src=src)
    return [b.cpu() for b in bufs]


def _comm_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def refuse(what: str) -> None:
    if active():
        raise InputError(f"{what} is not data-parallel yet", "run it in one process (without torchrun)")
