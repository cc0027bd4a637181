"""The one place that starts the process group and says which rank and device this process is."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: float | None = None) -> DistInfo:
    """Start DeepSpeed's process group from the launcher's environment: gloo on CPU; on GPU NCCL for
    CUDA tensors and gloo for CPU ones (the trainer reduces its metrics and stop flag as CPU tensors,
    which an NCCL-only group rejects: "No backend type associated with device type cpu").

    Works under ``deepspeed``, ``torchrun`` and ``srun`` (which the SLURM script maps to RANK /
    WORLD_SIZE / LOCAL_RANK), and as a single plain process. ``timeout_s``: how long a collective may
    wait for its peers before it fails (None: DeepSpeed's default, ``DEEPSPEED_TIMEOUT`` minutes or 10).
    """
    import deepspeed

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        timeout = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
        deepspeed.init_distributed(dist_backend="cpu:gloo,cuda:nccl" if cuda else "gloo", **timeout)
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        share_cpu_cores()
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def share_cpu_cores() -> None:
    """On CPU, give each local rank its share of the cores unless OMP_NUM_THREADS says otherwise.

    Every rank would otherwise start one thread per core, and N ranks on N cores oversubscribe
    them many times over (tens of times slower for small matmuls).
    """
    if "OMP_NUM_THREADS" in os.environ:
        return
    # torchrun and srun (launch/slurm) export LOCAL_WORLD_SIZE, the DeepSpeed launcher LOCAL_SIZE
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or "1")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_ranks)))


def release_shared_memory(every_local_rank: bool = False) -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer in /dev/shm (69 MB per rank and port).

    DeepSpeed's CPU backend never removes it, so every finished run would leave its buffers in RAM.
    Call it once this rank issues no more collectives; the mapping stays valid until exit. A failing
    rank removes its node's other ranks' buffers too (``every_local_rank``): the launcher kills the
    others as soon as one fails, before they can remove their own.
    """
    local_rank = "*" if every_local_rank else os.environ.get("LOCAL_RANK", "0")
    pattern = f"deepspeed_allreduce_buffer_*_{os.environ.get('MASTER_ADDR')}_{os.environ.get('MASTER_PORT')}_{local_rank}"
    for path in glob.glob(os.path.join("/dev/shm", pattern)):
        try:
            os.unlink(path)
        except OSError:
            pass


@contextmanager
def releasing_shared_memory(info: DistInfo) -> Iterator[None]:
    """Run the body (this rank's last collectives), then, on the CPU, unlink the rank's DeepSpeed
    buffer; if the body raised, its node's other ranks' too (:func:`release_shared_memory`)."""
    failed = True
    try:
        yield
        failed = False
    finally:
        if info.device.type == "cpu":
            release_shared_memory(every_local_rank=failed)
