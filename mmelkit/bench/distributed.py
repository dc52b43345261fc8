"""Sharding the benchmark over processes with torch.distributed (launch with ``torchrun``).

Each rank takes a contiguous shard of the samples, computes everything that is per sample (maps,
curves, perturbed embeddings for retrieval) and the shards are gathered on every rank, merged in
sample order; rank 0 computes the dataset-level metrics and writes the files. Without an
initialised process group (a plain ``python`` run) there is one rank and nothing is exchanged.

Fault tolerance: rank 0 alone reads and writes the cell cache and tells the other ranks what it
found (:func:`broadcast`), so ranks never disagree about which cells remain, even without a
shared file system. A killed worker makes ``torchrun`` stop the whole group; the cells finished
before it are on disk (written atomically), and a restart, with any number of ranks, computes only
the others.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of the current process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(count: int, rank: int, size: int) -> range:
    """The contiguous block of ``range(count)`` that ``rank`` of ``size`` ranks takes (sizes differ
    by at most one, earlier ranks take the extra samples)."""
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} outside a world of {size}")
    base, extra = divmod(count, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def gather(value: Any) -> list[Any]:
    """Every rank's ``value`` (any picklable object; tensors moved to the CPU first), in rank order."""
    rank, size = world()
    if size == 1:
        return [value]
    gathered: list[Any] = [None] * size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (any picklable object): for decisions every rank must share,
    such as whether a cell is already cached (a rank that disagreed would wait forever in the
    collectives of a cell the others skip)."""
    if world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def init_from_environment(device: str = "auto") -> tuple[bool, str]:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, ...).

    Returns (whether a group was started here, the device this rank should use): ``nccl`` and
    ``cuda:LOCAL_RANK`` when CUDA is available and ``device`` allows it, else ``gloo`` on the CPU.
    Without torchrun's variables nothing happens and ``device`` is returned unchanged.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return False, device
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    elif device == "auto":
        device = "cpu"
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True, device


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()
