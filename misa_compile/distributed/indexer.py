"""The context-parallel indexer: the single-device `indexer_topk` over keys sharded across the
ranks of a process group, with global key indices and the same result as one device holding all
keys (up to ties, whose order is unspecified everywhere).

Each rank holds a contiguous slice k[:, key_offset : key_offset + T_local] of the keys and the
same queries. What travels (W ranks, per query, fp32 values, int32 indices):
  misa / misa_hier router   all-reduce of per-head router scores: 4*H bytes
                            (plus one [B, D] block partial sum per rank per call)
  dense / misa selection    all-gather of W*min(k_top, T) (value, index) pairs: 8*W*k_top bytes
  misa_hier candidates      all-gather of W*min(n_cand, T) values: 4*W*n_cand bytes, then the
                            re-ranked selection is merged like the misa one
  every call                one all-gather of 17 int64 per rank (shapes, config, shard) to check
                            that the ranks agree"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..config import MisaConfig
from .merge import (compact_candidates, empty_selection, global_top_members, merge_topk,
                    pad_selection)
from .ranges import global_key_ranges, local_key_ranges
from .router import sharded_route_heads
from .shards import OP, ShardLayout, agree_on_call


def sharded_indexer_topk(q: Tensor, k_local: Tensor, w: Tensor, k_top: int,
                         config: MisaConfig = MisaConfig(), *, key_offset: int, total_keys: int,
                         group: Optional[dist.ProcessGroup] = None, scale: float = 1.0,
                         causal: bool = True, key_start: Optional[Tensor] = None,
                         key_end: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Top-k keys per query as selected by `config.variant` ("dense", "misa", "misa_hier"),
    over keys sharded across `group` (None: the default group). Collective: every rank of the
    group calls it with the same q, w, k_top, config, total_keys, causal and key ranges, and its
    own shard `k_local` [B, T_local, D] (T_local may be 0) holding global keys
    [key_offset, key_offset + T_local). The shards must tile [0, total_keys).

    causal, key_start, key_end are in GLOBAL key positions, as in the single-device op.
    Returns (values float32, indices int64 global) [B, S, min(k_top, total_keys)] on every rank;
    -inf values mark entries past the visible keys (their indices are meaningless)."""
    group, rank = member_of(group)
    layout = agree_on_call(group, rank, q, k_local, w, k_top, config, key_offset, total_keys,
                           scale, causal, key_start, key_end)
    return select_on_layout(q, k_local, w, k_top, config, layout, group, scale, causal,
                            key_start, key_end)


def member_of(group: Optional[dist.ProcessGroup]) -> tuple[dist.ProcessGroup, int]:
    """(the group, None meaning the default one; this process's rank in it)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{OP}: torch.distributed has no initialised process group; call "
                           "torch.distributed.init_process_group first (see "
                           "misa_compile.distributed.init_from_env)")
    group = dist.group.WORLD if group is None else group
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{OP}: this process is not a member of the given process group")
    return group, rank


def select_on_layout(q: Tensor, k_local: Tensor, w: Tensor, k_top: int, config: MisaConfig,
                     layout: ShardLayout, group, scale: float, causal: bool,
                     key_start: Optional[Tensor], key_end: Optional[Tensor]
                     ) -> tuple[Tensor, Tensor]:
    """The selection of `sharded_indexer_topk` once the ranks agreed on `layout`. Collective."""
    rank = layout.rank
    batch, queries, _, _ = q.shape
    lo, hi = global_key_ranges(batch, queries, layout.total_keys, causal, key_start, key_end,
                               q.device)
    start, end = local_key_ranges(lo, hi, layout.offset, layout.size)
    local_vis = dict(causal=False, key_start=start, key_end=end, chunk=config.query_chunk)
    ops = torch.ops.misa
    width = min(k_top, layout.total_keys)

    def local_top(op, *args, k: int, keep_local: bool = False) -> tuple[Tensor, Tensor]:
        """This shard's top-k by `op`, padded to the global width min(k, total_keys)."""
        padded = min(k, layout.total_keys)
        if layout.size == 0:
            return empty_selection(batch, queries, padded, q.device)
        values, indices = op(q, k_local, w, *args, k, scale, **local_vis)
        if not keep_local:
            indices = indices + layout.offset
        return pad_selection(values, indices, padded)

    if config.variant == "dense":
        values, indices = local_top(ops.dense_topk, k=k_top)
        return merge_topk(values, indices, width, group, "selection merge")

    heads = sharded_route_heads(q, k_local, w, config.active_heads, config.block_size,
                                config.router, layout, lo, hi, group, config.query_chunk)
    if config.variant == "misa":
        values, indices = local_top(ops.routed_topk, heads, k=k_top)
        return merge_topk(values, indices, width, group, "selection merge")

    # misa_hier: the global routed top-n_cand are the candidates; each rank re-ranks with all
    # heads the candidates it holds, then the re-ranked selections are merged.
    n_cand = min(config.candidates, layout.total_keys)
    cand_values, cand_local = local_top(ops.routed_topk, heads, k=n_cand, keep_local=True)
    members = global_top_members(cand_values, n_cand, rank, group, "candidate threshold")
    candidates = compact_candidates(members, cand_local)
    if layout.size == 0 or candidates.shape[-1] == 0:
        values, indices = empty_selection(batch, queries, width, q.device)
    else:
        values, indices = ops.rerank_topk(q, k_local, w, candidates, k_top, scale, **local_vis)
        values, indices = pad_selection(values, indices + layout.offset, width)
    return merge_topk(values, indices, width, group, "selection merge")
