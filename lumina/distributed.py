"""The trainer's process group: join it (or make a world of one), gather host objects, leave it.

Every launcher sets the same environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, the
rendezvous address); ``srun`` without a launcher sets ``SLURM_*`` instead, mapped here; a plain
``python -m lumina.train`` gets a world of one on a free local port. The backend follows
DeepSpeed's accelerator: NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import torch

__all__ = ["DistInfo", "init_distributed", "shutdown_distributed", "gather_objects"]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the world and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher_env(env: Any) -> None:
    """Fill ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` from SLURM, or for a single plain process."""
    if "RANK" not in env and "SLURM_PROCID" in env:  # srun without a launcher
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "RANK" not in env:  # a single plain process
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))


def init_distributed() -> DistInfo:
    """Join (or, alone, create) the process group; the backend follows the accelerator."""
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    _launcher_env(os.environ)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    acc = get_accelerator()
    on_cpu = acc.device_name() == "cpu"
    if not on_cpu:
        acc.set_device(local_rank)
    deepspeed.init_distributed(dist_backend=acc.communication_backend_name())
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device("cpu" if on_cpu else acc.device_name(local_rank))
    return DistInfo(rank, world, local_rank, device)


def gather_objects(obj: Any, world_size: int) -> list:
    """Every rank's ``obj`` (picklable, small), on every rank; no collective in a world of one."""
    if world_size == 1:
        return [obj]
    import torch

    out: list = [None] * world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def shutdown_distributed(exit_code: Optional[int] = None) -> None:
    """Barrier, destroy the process group and, given ``exit_code``, end the process at once.

    Ending with ``os._exit`` skips the C++ static destructors: with torch 2.13 + DeepSpeed 0.19 on
    gloo, a normal interpreter exit aborted now and then ("terminate called without an active
    exception", SIGABRT, exit -6) after all work was done and saved, failing the whole launch.
    """
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if exit_code is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(exit_code)
