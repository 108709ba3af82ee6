"""Agreement on one sharded call before any work: each rank checks its own inputs, then one small
all-gather of per-rank metadata lets every rank check the others' (same problem, same config,
shards that tile [0, total_keys) without overlap). Every rank reaches the same verdict from the same
gathered data, so a bad input anywhere raises the same clear error on every rank instead of leaving
the others waiting in a later collective."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..config import MisaConfig, ROUTERS, VARIANTS
from ..kernels.validation import check_indexer_inputs, check_positive_int, check_scale
from .collectives import all_gather_objects, all_gather_stacked, collective_device

OP = "sharded_indexer_topk"
SHARDED_VARIANTS = ("dense", "misa", "misa_hier")
# Global key indices travel as int32 in the top-k merge.
MAX_TOTAL_KEYS = 2**31 - 1

# Metadata every rank sends: its own shard, then fields that must agree across ranks.
_SHARD_FIELDS = ("key_offset", "local keys")
_SHARED_FIELDS = ("total_keys", "batch B", "queries S", "heads H", "dim D", "k_top",
                  "config.variant", "config.active_heads", "config.block_size",
                  "config.candidates", "config.router", "causal", "key ranges given", "scale")
# Column of each field in the gathered table (column 0: the rank's error flag).
_COLUMN = {name: column for column, name in enumerate(("error",) + _SHARD_FIELDS + _SHARED_FIELDS)}


@dataclass(frozen=True)
class ShardLayout:
    """Which global keys each rank of the group holds: rank r holds [offsets[r], offsets[r] +
    sizes[r])."""

    rank: int
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    total_keys: int

    @property
    def world(self) -> int:
        return len(self.offsets)

    @property
    def offset(self) -> int:
        return self.offsets[self.rank]

    @property
    def size(self) -> int:
        return self.sizes[self.rank]


def agree_on_call(group, rank: int, q, k_local, w, k_top, config, key_offset, total_keys, scale,
                  causal, key_start, key_end) -> ShardLayout:
    """Checks this rank's inputs and everyone's agreement; returns the layout or raises ValueError
    (the same message on every rank). key_offset = total_keys = None: the shards lie in rank
    order (rank 0 holds the first keys), so the offsets and the total key count follow from the
    gathered shard sizes; the same exchange then serves as the key-count exchange."""
    local_error: Optional[str] = None
    try:
        meta = _local_metadata(group, q, k_local, w, k_top, config, key_offset, total_keys, scale,
                               causal, key_start, key_end)
    except (TypeError, ValueError) as error:
        local_error = f"{type(error).__name__}: {error}"
        meta = [-1] * (len(_SHARD_FIELDS) + len(_SHARED_FIELDS))
    row = torch.tensor([int(local_error is not None)] + meta, dtype=torch.int64)
    gathered = all_gather_stacked(row.to(collective_device(group)), group, "shard agreement")
    table = gathered.cpu().tolist()
    if any(r[0] for r in table):
        messages = all_gather_objects(local_error, group, "input errors")
        lines = [f"rank {r}{' (this rank)' if r == rank else ''}: {m}"
                 for r, m in enumerate(messages) if m is not None]
        raise ValueError(f"{OP}: inputs rejected on {len(lines)} of {len(table)} ranks; "
                         + "; ".join(lines))
    _check_shared_fields(table)
    sizes = tuple(r[_COLUMN["local keys"]] for r in table)
    if key_offset is None:
        offsets = tuple(sum(sizes[:r]) for r in range(len(sizes)))
        total = sum(sizes)
        shared = table[0]
        _check_derived_total(total, shared[_COLUMN["queries S"]], bool(shared[_COLUMN["causal"]]))
    else:
        offsets = tuple(r[_COLUMN["key_offset"]] for r in table)
        total = table[0][_COLUMN["total_keys"]]
        _check_tiling(offsets, sizes, total)
    return ShardLayout(rank, offsets, sizes, total)


def _local_metadata(group, q, k_local, w, k_top, config, key_offset, total_keys, scale, causal,
                    key_start, key_end) -> list[int]:
    if not isinstance(config, MisaConfig):
        raise TypeError(f"{OP}: config must be a MisaConfig, got {type(config).__name__}")
    if config.variant not in SHARDED_VARIANTS:
        raise ValueError(f"{OP}: config.variant={config.variant!r} has no sharded form; allowed: "
                         f"{SHARDED_VARIANTS}")
    if not isinstance(k_local, Tensor) or k_local.dim() != 3:
        shape = tuple(k_local.shape) if isinstance(k_local, Tensor) else type(k_local).__name__
        raise ValueError(f"{OP}: k_local must have layout [B, T_local, D], got {shape}")
    batch, local_keys, dim = k_local.shape
    if isinstance(q, Tensor) and q.dim() == 4 and (batch, dim) != (q.shape[0], q.shape[3]):
        raise ValueError(f"{OP}: k_local has shape {tuple(k_local.shape)} but q "
                         f"{tuple(q.shape)} needs [B={q.shape[0]}, T_local, D={q.shape[3]}]")
    # The op checks need at least one key; an empty shard is checked as if it held one.
    stand_in = k_local if local_keys else k_local.new_zeros(batch, 1, dim)
    shape = check_indexer_inputs(OP, q, stand_in, w, key_start, key_end)
    check_positive_int(OP, "k_top", k_top)
    check_scale(OP, scale)
    config.check_site(shape.heads, k_top)
    if key_offset is None:
        # Rank order: offset and total come from the gathered sizes (-1 marks them unknown here,
        # identically on every rank, so the shared-field check passes).
        key_offset = total_keys = -1
    else:
        _check_int("total_keys", total_keys, 1, MAX_TOTAL_KEYS)
        _check_causal_total(total_keys, shape.queries, causal)
        _check_int("key_offset", key_offset, 0, total_keys)
        if key_offset + local_keys > total_keys:
            raise ValueError(f"{OP}: key_offset={key_offset} + local keys {local_keys} = "
                             f"{key_offset + local_keys} exceeds total_keys={total_keys}; this "
                             "rank's shard must lie inside [0, total_keys)")
    if collective_device(group).type == "cuda" and q.device.type != "cuda":
        raise ValueError(f"{OP}: q is on {q.device} but the process group's backend (NCCL) needs "
                         "CUDA tensors")
    scale_bits = struct.unpack("<q", struct.pack("<d", float(scale)))[0]
    return [key_offset, local_keys, total_keys, shape.batch, shape.queries, shape.heads, shape.dim,
            k_top, VARIANTS.index(config.variant), config.active_heads, config.block_size,
            config.candidates, ROUTERS.index(config.router), int(bool(causal)),
            int(key_start is not None), scale_bits]


def _check_causal_total(total_keys: int, queries: int, causal: bool) -> None:
    if causal and total_keys < queries:
        raise ValueError(f"{OP}: causal=True needs total_keys >= S (the S queries are the last S "
                         f"of the keys), got S={queries}, total_keys={total_keys}; pass "
                         "causal=False with key ranges for other layouts")


def _check_derived_total(total: int, queries: int, causal: bool) -> None:
    """The checks of an explicit total_keys, for a total summed from the gathered shard sizes
    (every rank sums the same table, so every rank raises alike)."""
    if not 1 <= total <= MAX_TOTAL_KEYS:
        raise ValueError(f"{OP}: the shards hold {total} keys together; allowed range is "
                         f"[1, {MAX_TOTAL_KEYS}]")
    _check_causal_total(total, queries, causal)


def _check_int(name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{OP}: {name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{OP}: {name}={value}; allowed range is [{low}, {high}]")


def _check_shared_fields(table: list[list[int]]) -> None:
    problems = []
    for name in _SHARED_FIELDS:
        column = _COLUMN[name]
        values = [r[column] for r in table]
        if len(set(values)) > 1:
            shown = values if name != "scale" else [struct.unpack("<d", struct.pack("<q", v))[0]
                                                    for v in values]
            problems.append(f"{name} (by rank: {shown})")
    if problems:
        raise ValueError(f"{OP}: ranks disagree on {'; '.join(problems)}; every rank must pass the "
                         "same queries, config and total_keys, and only its own key shard")


def _check_tiling(offsets: tuple[int, ...], sizes: tuple[int, ...], total: int) -> None:
    """Non-empty shards must tile [0, total) exactly; empty shards may sit anywhere."""
    held = sorted((off, off + size, rank) for rank, (off, size) in enumerate(zip(offsets, sizes))
                  if size > 0)
    listing = ", ".join(f"rank {r}: [{off}, {off + size})"
                        for r, (off, size) in enumerate(zip(offsets, sizes)))
    cursor, previous = 0, None
    for start, end, rank in held:
        if start < cursor:
            raise ValueError(f"{OP}: shards overlap: rank {previous} and rank {rank} both hold "
                             f"keys [{start}, {min(cursor, end)}) (shards: {listing}); each key "
                             "must live on exactly one rank")
        if start > cursor:
            raise ValueError(f"{OP}: keys [{cursor}, {start}) are held by no rank (shards: "
                             f"{listing}); the shards must tile [0, total_keys={total})")
        cursor, previous = end, rank
    if cursor != total:
        raise ValueError(f"{OP}: keys [{cursor}, {total}) are held by no rank (shards: {listing}); "
                         f"the shards must tile [0, total_keys={total})")
