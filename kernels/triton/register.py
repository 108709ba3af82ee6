"""Registers the Triton kernels as the CUDA implementations of the misa ops. Same validation and
semantics as the default implementations; what the kernels do not cover (a mask tensor, the
"qnorm" router) runs the chunked torch implementation on the GPU."""
from __future__ import annotations

from .. import ops, torch_impl
from ..validation import (check_index_tensor, check_indexer_inputs, check_positive_int,
                          check_scale)
from .hisa import hisa_candidates as _hisa_candidates
from .rerank import rerank_topk as _rerank_topk
from .router import route_heads as _route_heads
from .select import scored_topk


@ops.dense_topk.register_kernel("cuda")
def _dense_topk_cuda(q, k, w, k_top, scale=1.0, causal=True, key_start=None, key_end=None,
                     mask=None, chunk=0):
    check_indexer_inputs("misa.dense_topk", q, k, w, key_start, key_end, mask)
    check_positive_int("misa.dense_topk", "k_top", k_top)
    check_scale("misa.dense_topk", scale)
    if mask is not None:
        return torch_impl.dense_topk(q, k, w, k_top, scale, causal, key_start, key_end, mask,
                                     chunk)
    return scored_topk(q, k, w, None, k_top, scale, causal, key_start, key_end, chunk)


@ops.route_heads.register_kernel("cuda")
def _route_heads_cuda(q, k, w, active_heads, block_size=1024, router="score", causal=True,
                      key_start=None, key_end=None, mask=None, chunk=0):
    shape = check_indexer_inputs("misa.route_heads", q, k, w, key_start, key_end, mask)
    check_positive_int("misa.route_heads", "active_heads", active_heads, shape.heads)
    check_positive_int("misa.route_heads", "block_size", block_size)
    if router not in ops._ROUTERS:
        raise ValueError(f"misa.route_heads: router={router!r}; allowed: {ops._ROUTERS}")
    if mask is not None or router != "score":
        return torch_impl.route_heads(q, k, w, active_heads, block_size, router, causal,
                                      key_start, key_end, mask, chunk)
    return _route_heads(q, k, w, active_heads, block_size, causal, key_start, key_end)


@ops.routed_topk.register_kernel("cuda")
def _routed_topk_cuda(q, k, w, heads, k_top, scale=1.0, causal=True, key_start=None,
                      key_end=None, mask=None, chunk=0):
    shape = check_indexer_inputs("misa.routed_topk", q, k, w, key_start, key_end, mask)
    check_index_tensor("misa.routed_topk", "heads", heads, shape)
    check_positive_int("misa.routed_topk", "k_top", k_top)
    check_scale("misa.routed_topk", scale)
    if heads.numel() and (heads.min() < 0 or heads.max() >= shape.heads):
        raise ValueError(f"misa.routed_topk: heads must lie in [0, H) = [0, {shape.heads})")
    if mask is not None:
        return torch_impl.routed_topk(q, k, w, heads, k_top, scale, causal, key_start, key_end,
                                      mask, chunk)
    return scored_topk(q, k, w, heads, k_top, scale, causal, key_start, key_end, chunk)


@ops.rerank_topk.register_kernel("cuda")
def _rerank_topk_cuda(q, k, w, candidates, k_top, scale=1.0, causal=True, key_start=None,
                      key_end=None, mask=None, chunk=0):
    shape = check_indexer_inputs("misa.rerank_topk", q, k, w, key_start, key_end, mask)
    check_index_tensor("misa.rerank_topk", "candidates", candidates, shape)
    check_positive_int("misa.rerank_topk", "k_top", k_top)
    check_scale("misa.rerank_topk", scale)
    if mask is not None:
        return torch_impl.rerank_topk(q, k, w, candidates, k_top, scale, causal, key_start,
                                      key_end, mask, chunk)
    return _rerank_topk(q, k, w, candidates, k_top, scale, causal, key_start, key_end, chunk)


@ops.hisa_candidates.register_kernel("cuda")
def _hisa_candidates_cuda(q, k, w, block_size=128, num_blocks=64, causal=True, key_start=None,
                          key_end=None, mask=None, chunk=0):
    check_indexer_inputs("misa.hisa_candidates", q, k, w, key_start, key_end, mask)
    check_positive_int("misa.hisa_candidates", "block_size", block_size)
    check_positive_int("misa.hisa_candidates", "num_blocks", num_blocks)
    if mask is not None:
        return torch_impl.hisa_candidates(q, k, w, block_size, num_blocks, causal, key_start,
                                          key_end, mask, chunk)
    return _hisa_candidates(q, k, w, block_size, num_blocks, causal, key_start, key_end, chunk)
