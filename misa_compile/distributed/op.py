"""`misa::sharded_topk`: the context-parallel indexer as ONE custom op, so that the graph pass can
put it in a traced graph (MisaConfig(context_parallel=True)). Its collectives and data-dependent
sizes stay inside the op; Inductor treats it like any extern kernel.

The op runs on the default process group. Each rank passes its contiguous shard of the keys,
shards laid out in rank order (rank 0 holds the first keys). The indexer's agreement exchange
carries every rank's local key count, so that one all-gather (and one read of it on the host per
call) gives every rank its key offset and the total key count as well; then the selection runs as
in `sharded_indexer_topk`. The graph does not know the global key count when it is traced, so the
outputs are declared [B, S, k_top]: k_top must not exceed the global key count (checked at run
time, on every rank alike)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..config import MisaConfig
from ..kernels.validation import check_same_device
from .indexer import member_of, select_on_layout
from .shards import agree_on_call

OP_NAME = "misa.sharded_topk"


@torch.library.custom_op("misa::sharded_topk", mutates_args=())
def sharded_topk(q: Tensor, k_local: Tensor, w: Tensor, k_top: int, variant: str,
                 active_heads: int, block_size: int, candidates: int, router: str,
                 scale: float = 1.0, causal: bool = True, key_start: Optional[Tensor] = None,
                 key_end: Optional[Tensor] = None, chunk: int = 0) -> tuple[Tensor, Tensor]:
    """Global top-k keys per query over keys sharded across the default process group, as
    `sharded_indexer_topk` with the MisaConfig fields passed one by one. Collective: every rank
    calls it with the same q, w, k_top, settings and key ranges and its own shard k_local
    [B, T_local, D] (T_local may differ between ranks, or be 0). causal, key_start and key_end are
    in global key positions. Returns (values float32, indices int64 global) [B, S, k_top], the
    same on every rank; k_top must be <= the total key count."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{OP_NAME}: torch.distributed has no initialised process group; the "
                           "context-parallel indexer runs on the default group, so call "
                           "torch.distributed.init_process_group (or "
                           "misa_compile.distributed.init_from_env) first")
    config = MisaConfig(variant=variant, active_heads=active_heads, block_size=block_size,
                        candidates=candidates, router=router, query_chunk=chunk)
    group, rank = member_of(None)
    layout = agree_on_call(group, rank, q, k_local, w, k_top, config, None, None, scale, causal,
                           key_start, key_end)
    if k_top > layout.total_keys:
        # Every rank reads the same gathered sizes, so every rank raises here alike.
        raise ValueError(f"{OP_NAME}: k_top={k_top} exceeds the total key count "
                         f"{layout.total_keys} (local key counts by rank: {list(layout.sizes)}); "
                         "the rewritten site's outputs have k_top columns, so k_top must be <= "
                         "the keys of all ranks together")
    return select_on_layout(q, k_local, w, k_top, config, layout, group, scale, causal,
                            key_start, key_end)


@sharded_topk.register_fake
def _(q, k_local, w, k_top, variant, active_heads, block_size, candidates, router, scale=1.0,
      causal=True, key_start=None, key_end=None, chunk=0):
    check_same_device(OP_NAME, q, k_local=k_local, w=w, key_start=key_start, key_end=key_end)
    shape = (q.shape[0], q.shape[1], k_top)
    return q.new_empty(shape, dtype=torch.float32), q.new_empty(shape, dtype=torch.int64)
