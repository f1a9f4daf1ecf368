"""Data-parallel plumbing: one process per rank under `torchrun`, or a single process without it.

Gradients are summed across ranks once per optimizer step, after all micro-batches have been
accumulated (the same arithmetic as DistributedDataParallel with no_sync during accumulation).
Doing it explicitly keeps the loss free to run the LM head outside the module's forward (the
chunked loss) and lets a rank whose data ran out contribute zero gradients without a dummy
forward. gloo on CPU, nccl on GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def start_distributed() -> Distributed:
    """Join the process group torchrun set up (RANK/WORLD_SIZE/LOCAL_RANK), if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank=rank, world_size=world_size, device=device)


def stop_distributed(context: Distributed) -> None:
    if context.active and dist.is_initialized():
        dist.destroy_process_group()


def sum_across_ranks(context: Distributed, values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of `values` over ranks (a copy; float64 sums stay exact for counts)."""
    total = values.detach().clone().to(context.device)
    if context.active:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def max_across_ranks(context: Distributed, value: int) -> int:
    total = torch.tensor([value], dtype=torch.int64, device=context.device)
    if context.active:
        dist.all_reduce(total, op=dist.ReduceOp.MAX)
    return int(total.item())


def sum_gradients(context: Distributed, parameters: list[torch.nn.Parameter]) -> None:
    """Replace each gradient by its sum over ranks (missing gradients count as zero)."""
    if not context.active:
        return
    handles = []
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        handles.append(dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM, async_op=True))
    for handle in handles:
        handle.wait()


def gather_objects(context: Distributed, value: object) -> list[object]:
    """Every rank's `value`, in rank order (on every rank)."""
    if not context.active:
        return [value]
    gathered: list[object] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(context: Distributed, value: object) -> object:
    """Rank 0's `value`, on every rank."""
    if not context.active:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier(context: Distributed) -> None:
    if context.active:
        dist.barrier()
