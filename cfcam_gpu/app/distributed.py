"""Several processes (``torchrun``), one shard of the inputs each: small helpers around torch.distributed.

``torchrun --nproc-per-node N -m cfcam_gpu explain ...`` starts N copies of the command line; each reads
its place from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK), explains its ``shard`` of the
sorted inputs on its own GPU (``cuda:LOCAL_RANK``) and the ranks meet at ``barrier``\\ s. Without torchrun
(no WORLD_SIZE, or WORLD_SIZE=1) every helper is a no-op for one process and no process group is made, so
the one-process command line never touches torch.distributed.

Backend: NCCL when the process's device is CUDA, else gloo (CPU). Collectives take CPU or CUDA tensors
either way: a CPU tensor is moved to the GPU for NCCL and back.
"""
from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from typing import NamedTuple, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# A rank that waits at a barrier for longer than this gives up (torchrun normally stops the others as soon
# as one rank fails, well before). Long enough for a slow rank to finish a large shard.
TIMEOUT = datetime.timedelta(hours=2)


class Context(NamedTuple):
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}: expected an int in the environment, got {value!r}") from None


def context() -> Context:
    """(rank, world_size, local_rank) from the torchrun environment; (0, 1, 0) when it is absent."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"RANK/WORLD_SIZE/LOCAL_RANK: inconsistent values rank={rank}, world_size={world}, "
                         f"local_rank={local}")
    return Context(rank, world, local)


def device_spec(spec: str, ctx: Context | None = None) -> str:
    """The --device spec for this process: 'auto' or 'cuda' -> 'cuda:LOCAL_RANK' when there are several
    processes and CUDA is available; anything else (one process, 'cpu', an explicit 'cuda:N') as given.

    With fewer visible GPUs than local ranks, ranks share them round robin (LOCAL_RANK modulo the count):
    e.g. a scheduler that shows each process its own GPU as cuda:0, or 2 processes per GPU on purpose."""
    ctx = ctx or context()
    if ctx.distributed and spec in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{ctx.local_rank % torch.cuda.device_count()}"
    return spec


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init(device: torch.device | str = "cpu") -> Context:
    """Join the process group when WORLD_SIZE > 1 (NCCL for a CUDA ``device``, else gloo); returns the
    context. One process: nothing is initialised. Calling it again is harmless."""
    ctx = context()
    if not ctx.distributed or is_initialized():
        return ctx
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    return ctx


def destroy() -> None:
    """Leave the process group (if any)."""
    if is_initialized():
        dist.destroy_process_group()


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """This rank's items: ``items[rank::world]``. The shards of ranks 0..world-1 are disjoint, their union
    is ``items``, and they do not depend on anything but the list (every rank computes the same split)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank/world: expected 0 <= rank < world, got rank={rank}, world={world}")
    return list(items[rank::world])


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _collective_device(tensor: torch.Tensor) -> torch.device:
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over the ranks (``tensor`` itself in one process), on
    ``tensor``'s device. ``tensor`` is not modified."""
    if not is_initialized():
        return tensor
    work = tensor.detach().to(_collective_device(tensor), copy=True)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(tensor.device)


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` as rank ``src`` has it, on every rank (picklable objects; ``obj`` itself in one process)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into ``module`` on every rank (so that randomly initialised
    models agree across ranks). No-op in one process."""
    if not is_initialized():
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        work = tensor.detach().to(_collective_device(tensor))
        dist.broadcast(work, src=src)
        if work is not tensor:
            tensor.copy_(work)


def all_gather_object(obj: T) -> list[T]:
    """[rank 0's ``obj``, rank 1's, ...] on every rank (picklable objects; ``[obj]`` in one process)."""
    if not is_initialized():
        return [obj]
    boxes: list = [None] * dist.get_world_size()
    dist.all_gather_object(boxes, obj)
    return boxes
