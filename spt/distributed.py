"""What spt needs from torch.distributed, as no-ops in a single process.

Under ``accelerate launch`` / ``torchrun`` (gloo on CPU, NCCL on GPU) every rank runs the same code;
these helpers shard work by rank and bring results back together. With one process (the default, and
every unit test) they return their input unchanged and never touch torch.distributed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def launched() -> bool:
    """True in a process started by a multi-process launcher (torchrun / accelerate launch)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_launcher() -> tuple[int, int, str | None]:
    """Start the process group a launcher asked for (through accelerate); (rank, world size, device).

    Returns (0, 1, None) in a plain process. The device is this rank's (cuda:LOCAL_RANK or cpu)."""
    if not launched():
        return 0, 1, None
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes, str(state.device)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (e.g. a Ctrl-C seen by one rank, a non-finite loss)."""
    return sum_across([1.0 if flag else 0.0])[0] > 0


def sum_across(values: Sequence[float]) -> list[float]:
    """Element-wise sum of ``values`` over ranks (float64, so token counts and NLL sums stay exact)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return t.tolist()


def mean_across(values: dict[str, float]) -> dict[str, float]:
    """The mean over ranks of each value (the same keys on every rank)."""
    if not is_distributed():
        return values
    keys = sorted(values)
    sums = sum_across([values[k] for k in keys])
    return {k: s / world_size() for k, s in zip(keys, sums, strict=True)}


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0, in rank order; shards may differ in length. No gradient."""
    if not is_distributed():
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


def gather_objects(items: list[T]) -> list[T]:
    """Undo :func:`shard`: every rank's list, interleaved back into the original order (all ranks get it).

    The objects travel between our own ranks (pickled by torch.distributed), never from a file."""
    if not is_distributed():
        return items
    parts: list[list[T] | None] = [None] * world_size()
    dist.all_gather_object(parts, items)
    out: list[T] = []
    longest = max(len(p or []) for p in parts)
    for i in range(longest):
        out.extend(p[i] for p in parts if p is not None and i < len(p))
    return out


def shard(items: Sequence[T], rank_: int | None = None, world: int | None = None) -> list[T]:
    """This rank's items: every world-th one from position rank (undone by :func:`gather_objects`)."""
    r, w = (rank() if rank_ is None else rank_), (world_size() if world is None else world)
    return list(items[r::w])


class ShardedBatches(Sampler[list[int]]):
    """Each rank's share of every batch of ``batches``: the global batch size stays what the config says.

    A batch is split row-wise (row r goes to rank r % world), so a length-sorted batch gives every rank
    rows of similar length. A batch with fewer rows than ranks (only an epoch's last) is dropped, since
    a rank with no rows would have nothing to back-propagate."""

    def __init__(self, batches: Sampler[list[int]], rank_: int, world: int):
        self.batches, self.rank, self.world = batches, rank_, world

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            if len(batch) >= self.world:
                yield batch[self.rank::self.world]

    def __len__(self) -> int:
        return len(self.batches) - (1 if self._last_too_small() else 0)

    def _last_too_small(self) -> bool:
        n, b = len(self.batches.lengths), self.batches.batch_size
        return self.world > 1 and 0 < n % b < self.world


def assert_same(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Raise if any rank's ``tensors`` differ from rank 0's (compared by float64 sums and squared sums).

    Data parallelism keeps replicas identical only if every rank applies the same update; a rank that
    drifted (a non-deterministic op, a rank-dependent code path) would otherwise go unnoticed."""
    if not is_distributed():
        return
    names = sorted(tensors)
    mine = torch.tensor([v for k in names for v in (float(tensors[k].double().sum()),
                                                     float(tensors[k].double().pow(2).sum()))],
                        dtype=torch.float64, device=_device())
    ref = mine.clone()
    dist.broadcast(ref, src=0)
    if not torch.equal(mine, ref):
        bad = sorted({names[i // 2] for i in torch.nonzero(mine != ref).flatten().tolist()})
        raise RuntimeError(f"rank {rank()}: {what} differ from rank 0's ({', '.join(bad)}); the replicas diverged")


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it, on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
