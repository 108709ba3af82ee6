"""The misa custom ops (namespace `misa`). Each is functional, has a fake impl built from input
SymInts (so it traces under dynamic shapes, export and Inductor), and a default implementation in
vectorised, chunked torch (torch_impl.py) that runs on every device. Triton kernels register as the
CUDA implementation of the same ops (kernels/triton/).

Common arguments:
  q [B,S,H,D], k [B,T,D], w [B,S,H]   bf16/fp16/fp32 (compute is fp32); q and k may be fp8 e4m3
  scale     positive factor applied to the index score (the model's softmax/head scales)
  causal    end-aligned causal visibility (query i of S sees keys [0, T-S+i])
  key_start, key_end  optional int [B,S]: ragged key range [start, end) per query
  mask      optional, [B,S,T] or any shape broadcastable to it ([1,S,T], [S,T], stride-0
            expands; a [B,1,S,T] attention mask sliced [:, 0]): bool (True = visible) or
            bf16/fp16/fp32 additive (added to the scaled score; a value <= finfo(float16).min,
            e.g. -inf or finfo(bf16).min, hides the key)
  chunk     queries per CPU step; 0 picks from a memory budget (results do not depend on it)
  q_scale, k_scale  optional fp32 [B,S,H] / [B,T], finite and > 0: the op computes its math on
            q.float() * q_scale[..., None] and k.float() * k_scale[..., None] (dequantized FP8
            inputs; any input dtype; None = 1)
Selections: (values fp32, indices int64) [B,S,min(k_top,T)]; -inf values mark entries past the
visible keys, whose indices are in [0, T) but meaningless.

Out-of-range input VALUES (a head id outside [0, H), a q_scale / k_scale entry that is not finite
and > 0) raise a ValueError on the CPU and, on CUDA, in debug mode (validation.debug_checks or
MISA_DEBUG_CHECKS=1). On CUDA otherwise the op never synchronises with the host to look at them:
what indexes memory is clamped, and each affected query's row is poisoned: values NaN and
indices -1. route_heads gives the row -1 heads, which poison the routed_topk row that consumes
them; hisa_candidates gives it -1 ids, and rerank_topk, handed the same scales, poisons the row
itself. A bad k_scale entry poisons every row of its sequence."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from . import torch_impl
from .validation import (check_index_range, check_index_tensor, check_indexer_inputs,
                         check_positive_int, check_same_device, check_scale)

_ROUTERS = ("score", "qnorm")

# Per-device implementations. Each op validates its inputs once, here, then runs the
# implementation registered for the inputs' device type (kernels/triton/register.py registers the
# CUDA ones), or the chunked torch implementation that runs on every device.
_IMPLEMENTATIONS: dict[tuple[str, str], Callable] = {}


def register_implementation(op_name: str, device_type: str) -> Callable[[Callable], Callable]:
    """Decorator: `fn` (same positional arguments as torch_impl.<op_name>) implements the op on
    devices of `device_type`."""
    if not hasattr(torch_impl, op_name):
        raise ValueError(f"register_implementation: unknown misa op {op_name!r}")

    def register(fn: Callable) -> Callable:
        if (op_name, device_type) in _IMPLEMENTATIONS:
            raise ValueError(f"misa.{op_name} already has a {device_type} implementation")
        _IMPLEMENTATIONS[(op_name, device_type)] = fn
        return fn
    return register


def _implementation(op_name: str, device: torch.device) -> Callable:
    return _IMPLEMENTATIONS.get((op_name, device.type), getattr(torch_impl, op_name))


def _topk_outputs(q: Tensor, k: Tensor, k_top: int) -> tuple[Tensor, Tensor]:
    top = torch.sym_min(k_top, k.shape[1])
    shape = (q.shape[0], q.shape[1], top)
    return (q.new_empty(shape, dtype=torch.float32), q.new_empty(shape, dtype=torch.int64))


def check_dense_topk(q, k, w, k_top, scale, causal, key_start, key_end, mask, chunk, q_scale,
                     k_scale) -> None:
    """misa.dense_topk: shape checks always; value checks where
    validation.host_value_checks says so."""
    check_indexer_inputs("misa.dense_topk", q, k, w, key_start, key_end, mask,
                         causal=causal, chunk=chunk, q_scale=q_scale, k_scale=k_scale)
    check_positive_int("misa.dense_topk", "k_top", k_top)
    check_scale("misa.dense_topk", scale)


def check_route_heads(q, k, w, active_heads, block_size, router, causal, key_start, key_end, mask,
                      chunk, q_scale, k_scale) -> None:
    """misa.route_heads: shape checks always; value checks where
    validation.host_value_checks says so."""
    shape = check_indexer_inputs("misa.route_heads", q, k, w, key_start, key_end, mask,
                         causal=causal, chunk=chunk, q_scale=q_scale, k_scale=k_scale)
    check_positive_int("misa.route_heads", "active_heads", active_heads, shape.heads)
    check_positive_int("misa.route_heads", "block_size", block_size)
    if router not in _ROUTERS:
        raise ValueError(f"misa.route_heads: router={router!r}; allowed: {_ROUTERS}")


def check_routed_topk(q, k, w, heads, k_top, scale, causal, key_start, key_end, mask, chunk,
                      q_scale, k_scale) -> None:
    """misa.routed_topk: shape checks always; value checks where
    validation.host_value_checks says so."""
    shape = check_indexer_inputs("misa.routed_topk", q, k, w, key_start, key_end, mask,
                         causal=causal, chunk=chunk, q_scale=q_scale, k_scale=k_scale)
    check_same_device("misa.routed_topk", q, heads=heads)
    check_index_tensor("misa.routed_topk", "heads", heads, shape)
    check_positive_int("misa.routed_topk", "k_top", k_top)
    check_scale("misa.routed_topk", scale)
    check_index_range("misa.routed_topk", "heads", heads, shape.heads, "H")


def check_rerank_topk(q, k, w, candidates, k_top, scale, causal, key_start, key_end, mask, chunk,
                      q_scale, k_scale) -> None:
    """misa.rerank_topk: shape checks always; value checks where
    validation.host_value_checks says so."""
    shape = check_indexer_inputs("misa.rerank_topk", q, k, w, key_start, key_end, mask,
                         causal=causal, chunk=chunk, q_scale=q_scale, k_scale=k_scale)
    check_same_device("misa.rerank_topk", q, candidates=candidates)
    check_index_tensor("misa.rerank_topk", "candidates", candidates, shape)
    check_positive_int("misa.rerank_topk", "k_top", k_top)
    check_scale("misa.rerank_topk", scale)


def check_hisa_candidates(q, k, w, block_size, num_blocks, causal, key_start, key_end, mask, chunk,
                          q_scale, k_scale) -> None:
    """misa.hisa_candidates: shape checks always; value checks where
    validation.host_value_checks says so."""
    check_indexer_inputs("misa.hisa_candidates", q, k, w, key_start, key_end, mask,
                         causal=causal, chunk=chunk, q_scale=q_scale, k_scale=k_scale)
    check_positive_int("misa.hisa_candidates", "block_size", block_size)
    check_positive_int("misa.hisa_candidates", "num_blocks", num_blocks)


@torch.library.custom_op("misa::dense_topk", mutates_args=())
def dense_topk(q: Tensor, k: Tensor, w: Tensor, k_top: int, scale: float = 1.0,
               causal: bool = True, key_start: Optional[Tensor] = None,
               key_end: Optional[Tensor] = None, mask: Optional[Tensor] = None,
               chunk: int = 0, q_scale: Optional[Tensor] = None,
               k_scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The DSA lightning indexer with all H heads, then top-k over the visible keys."""
    check_dense_topk(q, k, w, k_top, scale, causal, key_start, key_end, mask, chunk, q_scale,
                     k_scale)
    return _implementation("dense_topk", q.device)(q, k, w, k_top, scale, causal, key_start,
        key_end, mask, chunk, q_scale, k_scale)


@dense_topk.register_fake
def _(q, k, w, k_top, scale=1.0, causal=True, key_start=None, key_end=None, mask=None, chunk=0,
      q_scale=None, k_scale=None):
    check_same_device("misa.dense_topk", q, k=k, w=w, key_start=key_start, key_end=key_end,
                      mask=mask, q_scale=q_scale, k_scale=k_scale)
    return _topk_outputs(q, k, k_top)


@torch.library.custom_op("misa::route_heads", mutates_args=())
def route_heads(q: Tensor, k: Tensor, w: Tensor, active_heads: int, block_size: int = 1024,
                router: str = "score", causal: bool = True, key_start: Optional[Tensor] = None,
                key_end: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                chunk: int = 0, q_scale: Optional[Tensor] = None,
                k_scale: Optional[Tensor] = None) -> Tensor:
    """The MISA router: per query, the `active_heads` heads with the largest
    |w| * sum over visible key blocks of ReLU(q . mean key of the block). int64 [B,S,h]."""
    check_route_heads(q, k, w, active_heads, block_size, router, causal, key_start, key_end, mask,
                      chunk, q_scale, k_scale)
    return _implementation("route_heads", q.device)(q, k, w, active_heads, block_size, router,
        causal, key_start, key_end, mask, chunk, q_scale, k_scale)


@route_heads.register_fake
def _(q, k, w, active_heads, block_size=1024, router="score", causal=True, key_start=None,
      key_end=None, mask=None, chunk=0, q_scale=None, k_scale=None):
    check_same_device("misa.route_heads", q, k=k, w=w, key_start=key_start, key_end=key_end,
                      mask=mask, q_scale=q_scale, k_scale=k_scale)
    return q.new_empty((q.shape[0], q.shape[1], active_heads), dtype=torch.int64)


@torch.library.custom_op("misa::routed_topk", mutates_args=())
def routed_topk(q: Tensor, k: Tensor, w: Tensor, heads: Tensor, k_top: int, scale: float = 1.0,
                causal: bool = True, key_start: Optional[Tensor] = None,
                key_end: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                chunk: int = 0, q_scale: Optional[Tensor] = None,
                k_scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """MISA sparse scoring + selection: the index score summed over each query's routed heads
    only (original signed weights), then top-k."""
    check_routed_topk(q, k, w, heads, k_top, scale, causal, key_start, key_end, mask, chunk,
                      q_scale, k_scale)
    return _implementation("routed_topk", q.device)(q, k, w, heads, k_top, scale, causal,
        key_start, key_end, mask, chunk, q_scale, k_scale)


@routed_topk.register_fake
def _(q, k, w, heads, k_top, scale=1.0, causal=True, key_start=None, key_end=None, mask=None,
      chunk=0, q_scale=None, k_scale=None):
    check_same_device("misa.routed_topk", q, k=k, w=w, heads=heads, key_start=key_start,
                      key_end=key_end, mask=mask, q_scale=q_scale, k_scale=k_scale)
    return _topk_outputs(q, k, k_top)


@torch.library.custom_op("misa::rerank_topk", mutates_args=())
def rerank_topk(q: Tensor, k: Tensor, w: Tensor, candidates: Tensor, k_top: int,
                scale: float = 1.0, causal: bool = True, key_start: Optional[Tensor] = None,
                key_end: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                chunk: int = 0, q_scale: Optional[Tensor] = None,
                k_scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Exact all-head index scores of candidate keys [B,S,C] only, then top-k among them.
    Candidates outside [0, T) (e.g. -1) are ignored; C < k_top pads with -inf."""
    check_rerank_topk(q, k, w, candidates, k_top, scale, causal, key_start, key_end, mask, chunk,
                      q_scale, k_scale)
    return _implementation("rerank_topk", q.device)(q, k, w, candidates, k_top, scale, causal,
        key_start, key_end, mask, chunk, q_scale, k_scale)


@rerank_topk.register_fake
def _(q, k, w, candidates, k_top, scale=1.0, causal=True, key_start=None, key_end=None,
      mask=None, chunk=0, q_scale=None, k_scale=None):
    check_same_device("misa.rerank_topk", q, k=k, w=w, candidates=candidates,
                      key_start=key_start, key_end=key_end, mask=mask, q_scale=q_scale,
                      k_scale=k_scale)
    return _topk_outputs(q, k, k_top)


@torch.library.custom_op("misa::hisa_candidates", mutates_args=())
def hisa_candidates(q: Tensor, k: Tensor, w: Tensor, block_size: int = 128,
                    num_blocks: int = 64, causal: bool = True,
                    key_start: Optional[Tensor] = None, key_end: Optional[Tensor] = None,
                    mask: Optional[Tensor] = None, chunk: int = 0,
                    q_scale: Optional[Tensor] = None, k_scale: Optional[Tensor] = None) -> Tensor:
    """HISA's block filter: key indices of the first and last visible block plus the top blocks
    by all-head signed block score; int64 [B,S,min(min(m, ceil(T/block))*block, T)], -1 past T.
    When the m blocks are all ceil(T/block) blocks, the ids are every key 0..T-1 in order."""
    check_hisa_candidates(q, k, w, block_size, num_blocks, causal, key_start, key_end, mask, chunk,
                          q_scale, k_scale)
    return _implementation("hisa_candidates", q.device)(q, k, w, block_size, num_blocks, causal,
        key_start, key_end, mask, chunk, q_scale, k_scale)


@hisa_candidates.register_fake
def _(q, k, w, block_size=128, num_blocks=64, causal=True, key_start=None, key_end=None,
      mask=None, chunk=0, q_scale=None, k_scale=None):
    check_same_device("misa.hisa_candidates", q, k=k, w=w, key_start=key_start, key_end=key_end,
                      mask=mask, q_scale=q_scale, k_scale=k_scale)
    keys = k.shape[1]
    total_blocks = (keys + block_size - 1) // block_size
    # Every key when all blocks are kept (torch_impl.every_key_kept), never more than T ids.
    width = torch.sym_min(torch.sym_min(num_blocks, total_blocks) * block_size, keys)
    return q.new_empty((q.shape[0], q.shape[1], width), dtype=torch.int64)
