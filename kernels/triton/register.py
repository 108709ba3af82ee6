"""Makes the Triton kernels the CUDA implementation of the misa ops, both eagerly and for the
compiler.

Each op's CUDA work is one launcher (launch/<op>.py) that runs the kernels through
torch.library.wrap_triton, with grids computed from shapes only and no host reads of tensor data.
It is used twice:

  eager     the public op (torch.ops.misa.*, a custom_op) runs it as its CUDA implementation
            (ops.register_implementation), with wrap_triton off: plain kernel launches.
  compiled  the same launcher is the body of a torch.library.triton_op (torch.ops.misa_triton.*),
            and the public op decomposes into that triton_op when AOTDispatcher functionalises a
            graph (torch.compile, AOTInductor), the way triton_op decomposes itself. Inductor then
            sees, schedules and packages the Triton kernels instead of an opaque Python call.

The public op stays opaque (its CPU implementation, export and ONNX see exactly what they saw
before) for inputs that are not on CUDA, for calls the kernels do not cover (kernels/coverage.py:
those run the chunked torch implementation, with a warning once per reason), in debug mode
(validation.debug_checks: the host-side value checks must run), and under torch.export, which
keeps misa.* nodes unless asked to decompose custom triton ops.

FP8 dequantization: q_scale is folded into the weights (launch/device_checks.py) and k_scale goes
to the kernels, which multiply each key's score by it (or pool k * k_scale for the router and
HISA)."""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
from torch import Tensor
from torch._library.triton import set_wrap_triton_enabled
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode
from torch.library import triton_op

from .. import ops, paged, torch_impl
from ..coverage import cuda_fallback_reason
from ..validation import debug_checks_enabled
from .launch.dense_topk import dense_topk_op
from .launch.hisa_candidates import hisa_candidates_op
from .launch.paged_decode_topk import paged_decode_topk_op
from .launch.paged_pooled_keys import paged_pooled_keys_op
from .launch.rerank_topk import rerank_topk_op
from .launch.route_heads import route_heads_op
from .launch.routed_topk import routed_topk_op

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


# The triton_ops: one per public op, same arguments minus the ones the kernels do not take
# (route_heads' router: only "score" reaches them). Their bodies are the launchers.

@triton_op("misa_triton::dense_topk", mutates_args=())
def dense_topk_kernels(q: Tensor, k: Tensor, w: Tensor, k_top: int, scale: float, causal: bool,
                       key_start: Optional[Tensor], key_end: Optional[Tensor],
                       mask: Optional[Tensor], chunk: int, q_scale: Optional[Tensor],
                       k_scale: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return dense_topk_op(q, k, w, k_top, scale, causal, key_start, key_end, mask, chunk, q_scale,
                         k_scale)


@triton_op("misa_triton::route_heads", mutates_args=())
def route_heads_kernels(q: Tensor, k: Tensor, w: Tensor, active_heads: int, block_size: int,
                        causal: bool, key_start: Optional[Tensor], key_end: Optional[Tensor],
                        mask: Optional[Tensor], q_scale: Optional[Tensor],
                        k_scale: Optional[Tensor]) -> Tensor:
    return route_heads_op(q, k, w, active_heads, block_size, causal, key_start, key_end, mask,
                          q_scale, k_scale)


@triton_op("misa_triton::routed_topk", mutates_args=())
def routed_topk_kernels(q: Tensor, k: Tensor, w: Tensor, heads: Tensor, k_top: int,
                        scale: float, causal: bool, key_start: Optional[Tensor],
                        key_end: Optional[Tensor], mask: Optional[Tensor], chunk: int,
                        q_scale: Optional[Tensor],
                        k_scale: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return routed_topk_op(q, k, w, heads, k_top, scale, causal, key_start, key_end, mask, chunk,
                          q_scale, k_scale)


@triton_op("misa_triton::rerank_topk", mutates_args=())
def rerank_topk_kernels(q: Tensor, k: Tensor, w: Tensor, candidates: Tensor, k_top: int,
                        scale: float, causal: bool, key_start: Optional[Tensor],
                        key_end: Optional[Tensor], mask: Optional[Tensor], chunk: int,
                        q_scale: Optional[Tensor],
                        k_scale: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return rerank_topk_op(q, k, w, candidates, k_top, scale, causal, key_start, key_end, mask,
                          chunk, q_scale, k_scale)


@triton_op("misa_triton::hisa_candidates", mutates_args=())
def hisa_candidates_kernels(q: Tensor, k: Tensor, w: Tensor, block_size: int, num_blocks: int,
                            causal: bool, key_start: Optional[Tensor],
                            key_end: Optional[Tensor], mask: Optional[Tensor], chunk: int,
                            q_scale: Optional[Tensor], k_scale: Optional[Tensor]) -> Tensor:
    return hisa_candidates_op(q, k, w, block_size, num_blocks, causal, key_start, key_end, mask,
                              chunk, q_scale, k_scale)


@triton_op("misa_triton::paged_decode_topk", mutates_args=())
def paged_decode_topk_kernels(q: Tensor, k_cache: Tensor, w: Tensor, block_table: Tensor,
                              seq_lens: Tensor, k_top: int, active_heads: int, block_size: int,
                              scale: float, q_scale: Optional[Tensor],
                              k_scale: Optional[Tensor],
                              pooled_keys: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return paged_decode_topk_op(q, k_cache, w, block_table, seq_lens, k_top, active_heads,
                                block_size, scale, q_scale, k_scale, pooled_keys)


@triton_op("misa_triton::paged_pooled_keys", mutates_args=())
def paged_pooled_keys_kernels(k_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                              block_size: int, k_scale: Optional[Tensor],
                              pooled: Optional[Tensor],
                              first_token: Optional[Tensor]) -> Tensor:
    return paged_pooled_keys_op(k_cache, block_table, seq_lens, block_size, k_scale, pooled,
                                first_token)


def _route_heads_arguments(a: dict) -> Optional[tuple]:
    if _fallback_reason("route_heads", a["router"]) is not None:
        return None
    return (a["q"], a["k"], a["w"], a["active_heads"], a["block_size"], a["causal"],
            a["key_start"], a["key_end"], a["mask"], a["q_scale"], a["k_scale"])


def _same_arguments(a: dict) -> tuple:
    return tuple(a.values())


# public op -> (its host checks, the triton_op, the launcher, the triton_op's arguments from the
# public op's bound arguments, or None when the kernels do not cover the call).
_KERNELS: dict[str, tuple[Callable, Callable, Callable, Callable]] = {
    "dense_topk": (ops.check_dense_topk, dense_topk_kernels, dense_topk_op, _same_arguments),
    "route_heads": (ops.check_route_heads, route_heads_kernels, route_heads_op,
                    _route_heads_arguments),
    "routed_topk": (ops.check_routed_topk, routed_topk_kernels, routed_topk_op,
                    _same_arguments),
    "rerank_topk": (ops.check_rerank_topk, rerank_topk_kernels, rerank_topk_op,
                    _same_arguments),
    "hisa_candidates": (ops.check_hisa_candidates, hisa_candidates_kernels, hisa_candidates_op,
                        _same_arguments),
    "paged_decode_topk": (paged.check_paged_inputs, paged_decode_topk_kernels,
                          paged_decode_topk_op, _same_arguments),
    "paged_pooled_keys": (paged.check_pooled_inputs, paged_pooled_keys_kernels,
                          paged_pooled_keys_op, _same_arguments),
}

_PUBLIC_OPS = {"dense_topk": ops.dense_topk, "route_heads": ops.route_heads,
               "routed_topk": ops.routed_topk, "rerank_topk": ops.rerank_topk,
               "hisa_candidates": ops.hisa_candidates,
               "paged_decode_topk": paged.paged_decode_topk,
               "paged_pooled_keys": paged.paged_pooled_keys}


def _bind(schema, args, kwargs) -> dict:
    """The op's arguments by name, in schema order, defaults filled in."""
    bound = {}
    for position, argument in enumerate(schema.arguments):
        if position < len(args):
            bound[argument.name] = args[position]
        elif argument.name in kwargs:
            bound[argument.name] = kwargs[argument.name]
        else:
            bound[argument.name] = argument.default_value
    return bound


def _eager_cuda(op_name: str) -> Callable:
    """The public op's CUDA implementation (called after its host checks): the launcher with
    plain launches, or the torch implementation for calls the kernels do not cover."""
    _, _, launcher, kernel_arguments = _KERNELS[op_name]
    schema = getattr(torch.ops.misa, op_name).default._schema

    def run(*args):
        arguments = kernel_arguments(_bind(schema, args, {}))
        if arguments is None:
            return getattr(torch_impl, op_name)(*args)
        with set_wrap_triton_enabled(False):
            return launcher(*arguments)
    return run


def _decompose_into_kernels(op_name: str) -> Callable:
    """register_torch_dispatch rule of the public op under FunctionalTensorMode (see the module
    docstring): the triton_op's call where the kernels cover it, else the opaque op."""
    check, kernels_op, _, kernel_arguments = _KERNELS[op_name]

    def rule(mode, op, types, args, kwargs):
        from torch.export._trace import custom_triton_ops_decomposition_disabled
        if custom_triton_ops_decomposition_disabled() or debug_checks_enabled():
            return mode.__torch_dispatch__(op, types, args, kwargs)
        if any(not issubclass(t, (FakeTensor, FunctionalTensor)) and t is not torch.Tensor
               for t in types):
            return NotImplemented
        bound = _bind(op._schema, args, kwargs)
        # The op's first tensor (q, or the key cache of paged_pooled_keys) gives the device.
        if next(iter(bound.values())).device.type != "cuda":
            return mode.__torch_dispatch__(op, types, args, kwargs)
        arguments = kernel_arguments(bound)
        if arguments is None:
            return mode.__torch_dispatch__(op, types, args, kwargs)
        with mode:
            # The shape-level checks the op's body would run at call time, at trace time instead
            # (the value checks are the kernels' to do on the device).
            check(*bound.values())
            return kernels_op(*arguments)
    return rule


# The eager CUDA implementation of each public op (arguments in the op's order).
CUDA_IMPLEMENTATIONS = {name: _eager_cuda(name) for name in _KERNELS}

for _name, _implementation in CUDA_IMPLEMENTATIONS.items():
    ops.register_implementation(_name, "cuda")(_implementation)
    _PUBLIC_OPS[_name].register_torch_dispatch(FunctionalTensorMode,
                                               _decompose_into_kernels(_name))
