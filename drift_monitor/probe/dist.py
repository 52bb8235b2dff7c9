"""torch.distributed, as the probe pass uses it: who am I, is there a group, and do all ranks agree.

Why one module: the monitor, the statistics' all-reduce and the cache decision each asked
"is a process group up, with more than one rank?" in their own words. Outside a group (one
process, the usual case) every function here is a no-op that needs no collective.
"""

from __future__ import annotations

import torch


def rank_world(group=None) -> tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) outside torch.distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def is_distributed(group=None) -> bool:
    """True when a process group is up with more than one rank (a collective is needed)."""
    return rank_world(group)[1] > 1


def collective_device(device: torch.device) -> torch.device:
    """Where a collective's tensor must live: NCCL reduces CUDA tensors only."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def on_every_rank(flag: bool, device: torch.device) -> bool:
    """``flag`` AND-ed over the ranks (one tiny collective); ``flag`` itself outside a group."""
    import torch.distributed as dist

    if not is_distributed():
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64, device=collective_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())
