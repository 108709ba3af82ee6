"""Input checks shared by every op implementation. They raise errors that name the argument, what
it was and what is allowed.

Shape, dtype and device checks are free and always run. Checks of tensor VALUES (scales > 0,
head ids in [0, H), paged lengths and pages in range) need the values on the host: free on the
CPU, where they always run, but a device-to-host synchronisation on CUDA, which would stall the
stream on every call and forbid CUDA-graph capture. On CUDA they therefore run only in debug mode
(`debug_checks()` or MISA_DEBUG_CHECKS=1); otherwise the kernels' launchers clamp what indexes
memory and poison the affected rows' outputs instead (launch/device_checks.py, docs/ops.md)."""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# q and k may also be FP8 e4m3 (DeepSeek-V3.2 stores its indexer inputs so), dequantized by
# q_scale / k_scale; w stays in FLOAT_DTYPES.
QUANTIZED_DTYPES = (torch.float8_e4m3fn,)
INDEX_DTYPES = (torch.int32, torch.int64)


_DEBUG = threading.local()


@contextlib.contextmanager
def debug_checks(enabled: bool = True):
    """Within the block, CUDA calls of the misa ops check their inputs' values on the host and
    raise the same errors as on the CPU, at the cost of a synchronisation per call. Read when an
    op runs eagerly or is traced: compile (torch.compile, export) inside the block to keep the
    checks in a compiled graph (the ops then stay opaque calls)."""
    previous = getattr(_DEBUG, "enabled", None)
    _DEBUG.enabled = enabled
    try:
        yield
    finally:
        _DEBUG.enabled = previous


def debug_checks_enabled() -> bool:
    """debug_checks() when inside one, else the environment variable MISA_DEBUG_CHECKS=1."""
    enabled = getattr(_DEBUG, "enabled", None)
    if enabled is not None:
        return enabled
    return os.environ.get("MISA_DEBUG_CHECKS", "0") == "1"


def host_value_checks(t: torch.Tensor) -> bool:
    """Whether the value checks run on the host for inputs on t's device: always off CUDA (they
    cost nothing there), in debug mode on CUDA."""
    return t.device.type != "cuda" or debug_checks_enabled()


@dataclass(frozen=True)
class IndexerShape:
    batch: int
    queries: int
    heads: int
    dim: int
    keys: int


def check_indexer_inputs(
    op: str,
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    key_start: Optional[torch.Tensor] = None,
    key_end: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    *,
    causal: bool = False,
    chunk: int = 0,
    extra_dtypes: tuple = (),
    q_scale: Optional[torch.Tensor] = None,
    k_scale: Optional[torch.Tensor] = None,
) -> IndexerShape:
    """Checks the canonical layout q [B,S,H,D], k [B,T,D], w [B,S,H], the dequantization scales
    q_scale [B,S,H] and k_scale [B,T], and the visibility inputs."""
    _check_rank(op, "q", q, 4, "[B, S, H, D]")
    _check_rank(op, "k", k, 3, "[B, T, D]")
    _check_rank(op, "w", w, 3, "[B, S, H]")
    batch, queries, heads, dim = q.shape
    keys = k.shape[1]
    for name, size in (("B", batch), ("S", queries), ("H", heads), ("D", dim), ("T", keys)):
        if size == 0:
            raise ValueError(f"{op}: empty input, {name}=0 (q {tuple(q.shape)}, k {tuple(k.shape)}); "
                             "every size must be >= 1")
    if causal and keys < queries:
        raise ValueError(f"{op}: causal=True needs T >= S (the S queries are the last S of the T "
                         f"keys), got S={queries}, T={keys}; pass causal=False with key ranges or "
                         "a mask for other layouts")
    if chunk < 0:
        raise ValueError(f"{op}: chunk={chunk}; allowed: 0 (automatic) or a positive number of "
                         "queries")
    if k.shape[0] != batch or k.shape[2] != dim:
        raise ValueError(f"{op}: k has shape {tuple(k.shape)} but q {tuple(q.shape)} needs "
                         f"k of shape [B={batch}, T, D={dim}]")
    if tuple(w.shape) != (batch, queries, heads):
        raise ValueError(f"{op}: w has shape {tuple(w.shape)}, expected [B, S, H] = "
                         f"{[batch, queries, heads]} to match q {tuple(q.shape)}")
    allowed = FLOAT_DTYPES + tuple(extra_dtypes)
    for name, t in (("q", q), ("k", k), ("w", w)):
        allowed_here = allowed + QUANTIZED_DTYPES if name != "w" else allowed
        if t.dtype not in allowed_here:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; allowed dtypes are "
                            f"{', '.join(str(d) for d in allowed_here)}")
    check_same_device(op, q, k=k, w=w, key_start=key_start, key_end=key_end, mask=mask,
                      q_scale=q_scale, k_scale=k_scale)
    _check_dequant_scale(op, "q_scale", q_scale, (batch, queries, heads), "[B, S, H]")
    _check_dequant_scale(op, "k_scale", k_scale, (batch, keys), "[B, T]")
    if (key_start is None) != (key_end is None):
        raise ValueError(f"{op}: key_start and key_end must be given together (ragged key ranges "
                         "[key_start, key_end) per query)")
    for name, t in (("key_start", key_start), ("key_end", key_end)):
        if t is None:
            continue
        if t.dtype not in INDEX_DTYPES:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; allowed: int32, int64")
        if tuple(t.shape) != (batch, queries):
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected [B, S] = "
                             f"{[batch, queries]}")
    if mask is not None:
        if mask.dtype != torch.bool and mask.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: mask has dtype {mask.dtype}; allowed: bool (True = visible) or "
                            "a float dtype (additive, -inf = hidden)")
        if not _broadcasts_to(tuple(mask.shape), (batch, queries, keys)):
            raise ValueError(f"{op}: mask has shape {tuple(mask.shape)}, expected [B, S, T] = "
                             f"{[batch, queries, keys]} or a shape that broadcasts to it "
                             "([1, S, T], [S, T], [B, 1, T], ...: size-1 dims, at most 3 dims; "
                             "slice a [B, 1, S, T] attention mask as mask[:, 0])")
    return IndexerShape(batch, queries, heads, dim, keys)


def _broadcasts_to(shape: tuple, target: tuple) -> bool:
    """True when a tensor of `shape` broadcasts to exactly `target` (no new leading dims beyond
    target's, each dim 1 or equal)."""
    if len(shape) > len(target):
        return False
    return all(size in (1, want) for size, want in zip(reversed(shape), reversed(target)))


def _check_dequant_scale(op: str, name: str, scale: Optional[torch.Tensor], expected: tuple,
                         layout: str, values: bool = True) -> None:
    """A dequantization scale multiplies q (per token and head) or k (per token) before the math.
    Only positive factors commute with ReLU and keep every ranking, so a zero, negative or
    non-finite scale is refused rather than silently changing the selection. values=False checks
    the dtype and shape only (a paged cache's scales are checked where keys are visible:
    paged._check_seq_lens_and_pages)."""
    if scale is None:
        return
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor or None, got {type(scale).__name__}")
    if scale.dtype != torch.float32:
        raise TypeError(f"{op}: {name} has dtype {scale.dtype}; allowed: torch.float32")
    if tuple(scale.shape) != expected:
        raise ValueError(f"{op}: {name} has shape {tuple(scale.shape)}, expected {layout} = "
                         f"{list(expected)}")
    if not values or not host_value_checks(scale):
        return
    bad = ~((scale > 0) & torch.isfinite(scale))
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{op}: {name}{list(where)} = {float(scale[where])}; every scale must be "
                         "finite and > 0 (a zero or negative scale would change the ranking, "
                         "since ReLU commutes only with positive factors)")


def check_index_range(op: str, name: str, t: torch.Tensor, high: int, what: str) -> None:
    """Values of t in [0, high) (one host sync for both bounds); value check, see
    host_value_checks."""
    if not t.numel() or not host_value_checks(t):
        return
    low, top = torch.stack(t.aminmax()).tolist()
    if low < 0 or top >= high:
        raise ValueError(f"{op}: {name} must lie in [0, {what}) = [0, {high}), "
                         f"got values in [{low}, {top}]")


def check_positive_int(op: str, name: str, value: int, maximum: Optional[int] = None) -> None:
    if value < 1 or (maximum is not None and value > maximum):
        allowed = f"[1, {maximum}]" if maximum is not None else ">= 1"
        raise ValueError(f"{op}: {name}={value}; allowed range is {allowed}")


def check_scale(op: str, scale: float) -> None:
    # A negative or zero factor changes (or erases) the ranking; only positive scales are no-ops
    # for selection, so only those may be folded into the op.
    if not scale > 0 or scale != scale or scale == float("inf"):
        raise ValueError(f"{op}: scale={scale}; must be a finite number > 0")


def check_index_tensor(op: str, name: str, t: torch.Tensor, shape: IndexerShape) -> None:
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; allowed: int32, int64")
    if t.dim() != 3 or t.shape[0] != shape.batch or t.shape[1] != shape.queries or t.shape[2] == 0:
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected [B={shape.batch}, "
                         f"S={shape.queries}, n>=1]")


def _check_rank(op: str, name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{op}: {name} must have layout {layout}, got shape {tuple(t.shape)}")


def check_same_device(op: str, q: torch.Tensor, reference: str = "q",
                      **others: Optional[torch.Tensor]) -> None:
    """Also called by the fake impls: a call mixing a "meta" tensor with real ones dispatches to
    the fake impl, which would otherwise return uninitialised tensors without any error.
    `reference` names `q` in the message (the op's first tensor)."""
    for name, t in others.items():
        if t is not None and t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {reference} is on {q.device}; "
                             "all inputs must be on one device")
