"""Functions the ranks of a RankPool run (module level, so they pickle by name)."""
from __future__ import annotations

import time

import torch

from misa_compile import MisaConfig
from misa_compile.distributed import (count_collective_bytes, sharded_indexer_topk,
                                      sharded_router_scores)
from misa_compile.distributed.merge import global_top_members
from misa_compile.distributed.ranges import global_key_ranges
from misa_compile.distributed.shards import agree_on_call

from .rank_pool import init_gloo


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
    config = MisaConfig(variant="misa", active_heads=1, block_size=block)
    layout = agree_on_call(group, rank, q, k_local, w, 1, config, key_offset, total_keys, 1.0,
                           causal, key_start, key_end)
    lo, hi = global_key_ranges(q.shape[0], q.shape[1], total_keys, causal, key_start, key_end,
                               q.device)
    return sharded_router_scores(q, k_local, w, block, layout, lo, hi, group)


def run_global_top_members(values, keep):
    group = torch.distributed.group.WORLD
    return global_top_members(values, keep, torch.distributed.get_rank(), group, "test")


def rank_that_fails_or_calls(rank, world, port, timeout_s, failing_rank, mode, case_kwargs,
                             answers):
    """Process body: `failing_rank` raises (mode "raise": the process dies) or stalls (mode
    "stall": alive, never calls) before the first collective; the others call the indexer and
    report (error type, message, seconds waited)."""
    init_gloo(rank, world, port, timeout_s)
    if rank == failing_rank:
        if mode == "raise":
            raise RuntimeError("injected failure before the first collective")
        time.sleep(timeout_s * 4)
        return
    started = time.monotonic()
    try:
        sharded_indexer_topk(**case_kwargs[rank])
        answers.put((rank, None, "returned", time.monotonic() - started))
    except Exception as error:
        answers.put((rank, type(error).__name__, str(error), time.monotonic() - started))
