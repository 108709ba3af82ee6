"""The collectives of the sharded indexer, in one place. Each one counts the bytes it moves (the
benchmark reports communication volume per query from these counts) and turns a failed or timed-out
collective into an error naming the step and the rank, instead of a bare backend message."""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor

# torch 2.13 renames all_gather_into_tensor to all_gather_single; torch 2.11 has only the old name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class CollectiveError(RuntimeError):
    """A collective of the sharded indexer failed: another rank raised, exited, or never reached
    the same call before the process group's timeout."""


@dataclass
class CollectiveTraffic:
    """Payload bytes of the collectives run while counting, by step. An all-reduce counts the
    size of the reduced tensor; an all-gather counts the gathered output (what every rank holds
    afterwards, its own share included). Wire traffic of a ring is close to these figures:
    2(W-1)/W of an all-reduce's size and (W-1)/W of an all-gather's output per rank."""

    bytes_by_step: dict[str, int] = field(default_factory=dict)
    calls: int = 0

    def add(self, step: str, nbytes: int) -> None:
        self.bytes_by_step[step] = self.bytes_by_step.get(step, 0) + nbytes
        self.calls += 1

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_step.values())


_active_traffic: contextvars.ContextVar[Optional[CollectiveTraffic]] = contextvars.ContextVar(
    "misa_collective_traffic", default=None)


@contextlib.contextmanager
def count_collective_bytes() -> Iterator[CollectiveTraffic]:
    """Counts the bytes of every sharded-indexer collective run inside the `with` block."""
    traffic = CollectiveTraffic()
    token = _active_traffic.set(traffic)
    try:
        yield traffic
    finally:
        _active_traffic.reset(token)


def _record(step: str, nbytes: int) -> None:
    traffic = _active_traffic.get()
    if traffic is not None:
        traffic.add(step, nbytes)


def _failed(step: str, kind: str, group, error: Exception) -> CollectiveError:
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    return CollectiveError(
        f"sharded_indexer_topk: the {kind} of '{step}' failed on rank {rank} of {world}: {error}. "
        "Another rank raised, exited or did not reach the same call; the wait is bounded by the "
        "timeout given to init_process_group")


def all_reduce_sum(tensor: Tensor, group, step: str) -> Tensor:
    """Sums `tensor` over the ranks, in place; every rank receives the same bits."""
    try:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    except RuntimeError as error:
        raise _failed(step, "all-reduce", group, error) from error
    _record(step, tensor.numel() * tensor.element_size())
    return tensor


def all_gather_stacked(tensor: Tensor, group, step: str) -> Tensor:
    """[W, *tensor.shape]: every rank's `tensor` (same shape and dtype on every rank), by rank."""
    world = dist.get_world_size(group)
    # Gathered flat: the concatenated form is the one every backend accepts.
    flat = tensor.contiguous().view(-1)
    out = flat.new_empty(world * flat.numel())
    try:
        _all_gather_single(out, flat, group=group)
    except RuntimeError as error:
        raise _failed(step, "all-gather", group, error) from error
    _record(step, out.numel() * out.element_size())
    return out.view((world,) + tuple(tensor.shape))


def all_gather_objects(obj: Any, group, step: str) -> list:
    """Every rank's picklable `obj`, by rank (slow path: only for error messages)."""
    out: list = [None] * dist.get_world_size(group)
    try:
        dist.all_gather_object(out, obj, group=group)
    except RuntimeError as error:
        raise _failed(step, "all-gather", group, error) from error
    return out


def collective_device(group) -> torch.device:
    """Where this group's tensors must live: the current CUDA device for NCCL, else the CPU."""
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
