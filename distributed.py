"""Several processes (torchrun / accelerate launch): who this process is, sharding work, gathering results.

    torchrun --nproc_per_node 2 main.py --task evaluate ...     each process evaluates every 2nd sample;
                                                                 process 0 gathers them in order and writes
Training needs none of this: the Trainer (accelerate) shards its batches itself.
"""

from __future__ import annotations

import os


def world() -> tuple[int, int]:
    """(rank, world size); joins the process group the launcher prepared (gloo on CPU, nccl on GPUs)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        if backend == "nccl":  # else every rank's all_gather_object tensors land on cuda:0
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def shard(items: list, rank: int, size: int) -> list:
    """Every size-th item from rank: the shards interleave, so gather() restores the order."""
    return items[rank::size]


def gather(local: list, rank: int, size: int) -> list:
    """All shards back in the original order (on every process)."""
    if size == 1:
        return local
    import torch.distributed as dist

    parts: list = [None] * size
    dist.all_gather_object(parts, local)
    out = []
    for i in range(max(len(p) for p in parts)):
        out += [p[i] for p in parts if i < len(p)]
    return out


def total(values: list[float], size: int) -> list[float]:
    """Element-wise sum over the processes."""
    if size == 1:
        return values
    import torch.distributed as dist

    parts: list = [None] * size
    dist.all_gather_object(parts, values)
    return [sum(p[i] for p in parts) for i in range(len(values))]


def close() -> None:
    """Leave the process group together: without it the first process to finish exits while the others still
    talk to it, and gloo aborts that process ("terminate called without an active exception")."""
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
