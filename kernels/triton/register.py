"""Registers the Triton kernels as the CUDA implementations of the misa ops (the ops validate
their inputs before calling these). What the kernels do not cover (a mask tensor, the "qnorm"
router) runs the chunked torch implementation on the GPU."""
from __future__ import annotations

from .. import torch_impl
from ..ops import register_implementation
from .hisa import hisa_candidates as _hisa_candidates
from .rerank import rerank_topk as _rerank_topk
from .router import route_heads as _route_heads
from .select import scored_topk


@register_implementation("dense_topk", "cuda")
def _dense_topk_cuda(q, k, w, k_top, scale, causal, key_start, key_end, mask, chunk):
    if mask is not None:
        return torch_impl.dense_topk(q, k, w, k_top, scale, causal, key_start, key_end, mask,
                                     chunk)
    return scored_topk(q, k, w, None, k_top, scale, causal, key_start, key_end, chunk)


@register_implementation("route_heads", "cuda")
def _route_heads_cuda(q, k, w, active_heads, block_size, router, causal, key_start, key_end,
                      mask, chunk):
    if mask is not None or router != "score":
        return torch_impl.route_heads(q, k, w, active_heads, block_size, router, causal,
                                      key_start, key_end, mask, chunk)
    return _route_heads(q, k, w, active_heads, block_size, causal, key_start, key_end)


@register_implementation("routed_topk", "cuda")
def _routed_topk_cuda(q, k, w, heads, k_top, scale, causal, key_start, key_end, mask, chunk):
    if mask is not None:
        return torch_impl.routed_topk(q, k, w, heads, k_top, scale, causal, key_start, key_end,
                                      mask, chunk)
    return scored_topk(q, k, w, heads, k_top, scale, causal, key_start, key_end, chunk)


@register_implementation("rerank_topk", "cuda")
def _rerank_topk_cuda(q, k, w, candidates, k_top, scale, causal, key_start, key_end, mask, chunk):
    if mask is not None:
        return torch_impl.rerank_topk(q, k, w, candidates, k_top, scale, causal, key_start,
                                      key_end, mask, chunk)
    return _rerank_topk(q, k, w, candidates, k_top, scale, causal, key_start, key_end, chunk)


@register_implementation("hisa_candidates", "cuda")
def _hisa_candidates_cuda(q, k, w, block_size, num_blocks, causal, key_start, key_end, mask,
                          chunk):
    if mask is not None:
        return torch_impl.hisa_candidates(q, k, w, block_size, num_blocks, causal, key_start,
                                          key_end, mask, chunk)
    return _hisa_candidates(q, k, w, block_size, num_blocks, causal, key_start, key_end, chunk)
