"""Registers the Triton kernels as the CUDA implementations of the misa ops (the ops validate
their inputs before calling these). Every mask form, ragged ranges, causality and FP8 inputs run
in the kernels. What they do not cover is listed in kernels/coverage.py (the "qnorm" router):
such a call runs the chunked torch implementation on the GPU and warns once per reason.

FP8 dequantization: q_scale is folded into the weights here (w * q_scale, fp32: a positive factor
per query and head commutes with the ReLU of the index score, HISA's block score and the router's
|w|-weighted sum), and k_scale goes to the kernels, which multiply each key's score by it (or pool
k * k_scale for the router and HISA)."""
from __future__ import annotations

import warnings
from typing import Optional

from .. import torch_impl
from ..coverage import cuda_fallback_reason
from ..ops import register_implementation
from .hisa import hisa_candidates as _hisa_candidates
from .paged_decode import paged_decode_topk as _paged_decode_topk
from .rerank import rerank_topk as _rerank_topk
from .router import route_heads as _route_heads
from .select import scored_topk

_WARNED: set[str] = set()


def _fallback_reason(op_name: str, router: str = "score") -> Optional[str]:
    """Why this CUDA call runs the torch implementation (None: the kernels run it), warning the
    first time each reason occurs: a fallback is correct but much slower."""
    reason = cuda_fallback_reason(op_name, router)
    if reason is not None and reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"misa.{op_name} on CUDA runs the chunked torch implementation: {reason}",
                      RuntimeWarning, stacklevel=3)
    return reason


def _fold_query_scale(w, q_scale):
    # q_scale is validated finite and > 0, so the fold is exact up to one fp32 rounding.
    return w if q_scale is None else w.float() * q_scale


@register_implementation("dense_topk", "cuda")
def _dense_topk_cuda(q, k, w, k_top, scale, causal, key_start, key_end, mask, chunk,
                     q_scale=None, k_scale=None):
    return scored_topk(q, k, _fold_query_scale(w, q_scale), None, k_top, scale, causal,
                       key_start, key_end, chunk, k_scale=k_scale, mask=mask)


@register_implementation("route_heads", "cuda")
def _route_heads_cuda(q, k, w, active_heads, block_size, router, causal, key_start, key_end,
                      mask, chunk, q_scale=None, k_scale=None):
    if _fallback_reason("route_heads", router) is not None:
        return torch_impl.route_heads(q, k, w, active_heads, block_size, router, causal,
                                      key_start, key_end, mask, chunk, q_scale, k_scale)
    return _route_heads(q, k, _fold_query_scale(w, q_scale), active_heads, block_size, causal,
                        key_start, key_end, k_scale=k_scale, mask=mask)


@register_implementation("routed_topk", "cuda")
def _routed_topk_cuda(q, k, w, heads, k_top, scale, causal, key_start, key_end, mask, chunk,
                      q_scale=None, k_scale=None):
    return scored_topk(q, k, _fold_query_scale(w, q_scale), heads, k_top, scale, causal,
                       key_start, key_end, chunk, k_scale=k_scale, mask=mask)


@register_implementation("rerank_topk", "cuda")
def _rerank_topk_cuda(q, k, w, candidates, k_top, scale, causal, key_start, key_end, mask, chunk,
                      q_scale=None, k_scale=None):
    return _rerank_topk(q, k, _fold_query_scale(w, q_scale), candidates, k_top, scale, causal,
                        key_start, key_end, chunk, k_scale=k_scale, mask=mask)


@register_implementation("hisa_candidates", "cuda")
def _hisa_candidates_cuda(q, k, w, block_size, num_blocks, causal, key_start, key_end, mask,
                          chunk, q_scale=None, k_scale=None):
    return _hisa_candidates(q, k, _fold_query_scale(w, q_scale), block_size, num_blocks, causal,
                            key_start, key_end, chunk, k_scale=k_scale, mask=mask)


@register_implementation("paged_decode_topk", "cuda")
def _paged_decode_topk_cuda(q, k_cache, w, block_table, seq_lens, k_top, active_heads,
                            block_size, scale, q_scale=None, k_scale=None):
    return _paged_decode_topk(q, k_cache, _fold_query_scale(w, q_scale), block_table, seq_lens,
                              k_top, active_heads, block_size, scale, k_scale=k_scale)
