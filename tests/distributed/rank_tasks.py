"""Functions the ranks of a RankPool run (module level, so they pickle by name)."""
from __future__ import annotations

import torch

from misa_compile.distributed import (count_collective_bytes, sharded_indexer_topk,
                                      sharded_router_scores)
from misa_compile.distributed.ranges import global_key_ranges
from misa_compile.distributed.shards import agree_on_call


def run_sharded(q, k_local, w, k_top, config, **kwargs):
    return sharded_indexer_topk(q, k_local, w, k_top, config, **kwargs)


def run_sharded_counting_bytes(q, k_local, w, k_top, config, **kwargs):
    with count_collective_bytes() as traffic:
        sharded_indexer_topk(q, k_local, w, k_top, config, **kwargs)
    return dict(traffic.bytes_by_step)


def run_router_scores(q, k_local, w, block, key_offset, total_keys, causal, key_start, key_end):
    """The sharded router scores (|w| applied), with the layout agreed as the indexer does."""
    group = torch.distributed.group.WORLD
    rank = torch.distributed.get_rank()
    layout = agree_on_call(group, rank, q, k_local, w, 1, _router_config(block), key_offset,
                           total_keys, 1.0, causal, key_start, key_end)
    lo, hi = global_key_ranges(q.shape[0], q.shape[1], total_keys, causal, key_start, key_end,
                               q.device)
    return sharded_router_scores(q, k_local, w, block, layout, lo, hi, group)


def _router_config(block):
    from misa_compile import MisaConfig
    return MisaConfig(variant="misa", active_heads=1, block_size=block)


def run_global_top_members(values, keep):
    from misa_compile.distributed.merge import global_top_members
    group = torch.distributed.group.WORLD
    return global_top_members(values, keep, torch.distributed.get_rank(), group, "test")
