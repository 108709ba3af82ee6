"""ONNX translations of the misa ops, for `torch.onnx.export(..., custom_translation_table=...)`.

Each op becomes a small graph of standard ONNX operators (MatMul, Relu, Mul, ReduceSum, Gather,
GatherElements, Where, TopK, ...), so ONNX Runtime and TensorRT's ONNX parser run it without a
plugin. The math follows kernels/torch_impl.py step by step: fp32 compute, the same visibility rule
(end-aligned causal, ragged [key_start, key_end), bool mask or additive mask where values at or
below kernels.visibility.HIDDEN_BIAS hide a key), NaN scores ranked with the hidden keys and
infinities clamped as torch.nan_to_num does.

TopK's K is always a constant (TensorRT needs one). When the key axis is dynamic, min(k_top, T) is
not, so the scores are padded with k_top hidden (-inf) columns, the top k_top taken, and the result
cut to min(k_top, T): ONNX TopK ranks equal values by lower index, so the padding never displaces a
real key. The ONNX graph is not chunked: it holds the [B, S, H, T] per-head logits at once, so
callers bound memory by feeding queries in chunks.

Dequantization scales (q_scale [B,S,H], k_scale [B,T]) become a Cast to float and a Mul, as in
torch_impl.dequantize. FP8 e4m3 q / k need opset 19 or later (the first Cast from float8).

With `custom_domain=True` every op becomes one node of the "misa" domain instead (schemas in
`MISA_SCHEMAS`, registered with onnx.defs), for runtimes that provide the kernels as plugins. Those
nodes take no dequantization scales and no FP8 inputs: such calls raise NotImplementedError."""
from __future__ import annotations

from typing import Callable, Optional

import onnx
import onnxscript
import torch
from onnx import defs
from onnxscript import opset18 as op

from .kernels.visibility import HIDDEN_BIAS

FLOAT = onnx.TensorProto.FLOAT
INT64 = onnx.TensorProto.INT64
BOOL = onnx.TensorProto.BOOL
FLOAT_MAX = torch.finfo(torch.float32).max
NEG_INF = float("-inf")
POS_INF = float("inf")

MISA_DOMAIN = "misa"
MISA_DOMAIN_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Small builders


def _ints(*values: int):
    """A 1-D int64 constant."""
    return op.Constant(value_ints=list(values))


def _int(value: int):
    """A 0-D int64 constant."""
    return op.Constant(value_int=value)


def _float(value: float):
    """A 0-D float32 constant."""
    return op.Constant(value_float=value)


def _size(x, axis: int):
    """x.shape[axis] as a 0-D int64 tensor (folded to a constant when the axis is static)."""
    return op.Gather(op.Shape(x), _int(axis), axis=0)


def _static_size(x, axis: int) -> Optional[int]:
    """x.shape[axis] as an int when the exporter knows it statically, else None."""
    shape = getattr(x, "shape", None)
    if shape is None:
        return None
    size = shape[axis]
    return size if isinstance(size, int) else None


def _as_1d(scalar):
    return op.Reshape(scalar, _ints(1))


def _f32(x):
    return op.Cast(x, to=FLOAT)


def _real(x, scale):
    """x as its float32 real values: x * scale[..., None] when a dequantization scale is given."""
    x32 = _f32(x)
    return x32 if scale is None else op.Mul(x32, op.Unsqueeze(_f32(scale), _ints(-1)))


# ---------------------------------------------------------------------------------------------
# Shared pieces of the math


def _per_head_logits(q32, keys32):
    """ReLU(q . k): q [B,S,H,D] with keys [B,T,D] shared by all heads -> [B,S,H,T]."""
    keys_t = op.Unsqueeze(op.Transpose(keys32, perm=[0, 2, 1]), _ints(1))  # [B,1,D,T]
    return op.Relu(op.MatMul(q32, keys_t))


def _sum_heads(w32, logits):
    """Σ_j w[b,s,j] · logits[b,s,j,t]: w [B,S,H], logits [B,S,H,T] -> [B,S,T], as one MatMul."""
    return op.Squeeze(op.MatMul(op.Unsqueeze(w32, _ints(2)), logits), _ints(2))


def _nan_to_num(scores):
    """torch.nan_to_num(scores, nan=-inf): NaN -> -inf, ±inf -> ±float32 max."""
    clamped = op.Clip(scores, _float(-FLOAT_MAX), _float(FLOAT_MAX))
    return op.Where(op.IsNaN(scores), _float(NEG_INF), clamped)


def _visibility(positions, queries, keys, causal, key_start, key_end, mask_at_positions,
                mask_is_bool: bool = False):
    """Which `positions` (int64 key ids, [1,1,T] or [B,S,C]) each query may see;
    `mask_at_positions` is the mask read at those positions (bool when `mask_is_bool`).

    Returns (visible bool broadcastable to [B,S,*] or None when everything is visible,
    additive bias float32 or None), following kernels/visibility.chunk_visibility."""
    visible = None

    def both(a, b):
        return b if a is None else op.And(a, b)

    if causal:
        # End-aligned: query i of S sees keys [0, T - S + i].
        last = op.Add(op.Sub(keys, queries), op.Range(_int(0), queries, _int(1)))
        visible = both(visible, op.LessOrEqual(positions, op.Unsqueeze(last, _ints(1))))
    if key_start is not None:
        start = op.Unsqueeze(op.Cast(key_start, to=INT64), _ints(2))
        end = op.Unsqueeze(op.Cast(key_end, to=INT64), _ints(2))
        visible = both(visible, op.GreaterOrEqual(positions, start))
        visible = both(visible, op.Less(positions, end))
    bias = None
    if mask_at_positions is not None:
        if mask_is_bool:
            visible = both(visible, mask_at_positions)
        else:
            bias = _f32(mask_at_positions)
            visible = both(visible, op.Greater(bias, _float(HIDDEN_BIAS)))
    return visible, bias


def _mask_is_bool(mask) -> bool:
    """Whether an op's mask input is bool (visible/hidden) rather than additive. Read from the
    op's input, whose dtype the exporter always knows (not from values computed from it)."""
    dtype = getattr(mask, "dtype", None)
    if dtype is None:
        raise ValueError("misa ONNX translation: the mask's dtype is unknown, so it cannot tell a "
                         "bool mask from an additive one")
    return int(dtype) == BOOL


def _finish_scores(scores, visible, bias, scale: float):
    """scale, additive bias, NaN/inf handling, then -inf on hidden keys (torch_impl order)."""
    if scale != 1.0:
        scores = op.Mul(scores, _float(scale))
    if bias is not None:
        scores = op.Add(scores, bias)
    scores = _nan_to_num(scores)
    if visible is not None:
        scores = op.Where(visible, scores, _float(NEG_INF))
    return scores


def _top_slots(scores, k: int, available, available_static: Optional[int]):
    """The min(k, available) best entries of scores [B,S,W] along the last axis with a constant
    TopK K. `available` (0-D int64) may exceed W: the missing entries come back as -inf with
    slots >= W. Returns (values, slots)."""
    width = _static_size(scores, -1)
    if available_static is not None and width is not None and width >= min(k, available_static):
        return op.TopK(scores, _ints(min(k, available_static)), axis=-1, largest=1, sorted=1)
    # Pad with k hidden columns so that a constant K is always valid; equal values rank by lower
    # index, so real entries come before the padding.
    batch_and_queries = op.Shape(scores, start=0, end=2)
    padding = op.Expand(_float(NEG_INF), op.Concat(batch_and_queries, _ints(k), axis=0))
    padded = op.Concat(scores, padding, axis=-1)
    if available_static is not None:
        return op.TopK(padded, _ints(min(k, available_static)), axis=-1, largest=1, sorted=1)
    values, slots = op.TopK(padded, _ints(k), axis=-1, largest=1, sorted=1)
    kept = op.Min(_ints(k), _as_1d(available))
    return (op.Slice(values, _ints(0), kept, _ints(-1)),
            op.Slice(slots, _ints(0), kept, _ints(-1)))


def _key_positions(keys):
    """[1, 1, T] int64 key ids."""
    return op.Reshape(op.Range(_int(0), keys, _int(1)), _ints(1, 1, -1))


def _num_blocks(keys, block: int):
    return op.Div(op.Add(keys, _int(block - 1)), _int(block))


def _pad_last_axis(x, amount, value):
    """Pads a rank-3 tensor at the end of its last axis by `amount` (0-D int64)."""
    pads = op.Concat(_ints(0, 0, 0, 0, 0), _as_1d(amount), axis=0)
    return op.Pad(x, pads, value)


def _split_blocks(x, num_blocks, block: int):
    """[b, n, nb*block] -> [b, n, nb, block]."""
    shape = op.Concat(op.Shape(x, start=0, end=2), _as_1d(num_blocks), _ints(block), axis=0)
    return op.Reshape(x, shape)


def _pooled_keys(k32, keys, num_blocks, block: int):
    """Mean of k [B,T,D] over blocks of `block` keys -> [B,nb,D]; the last, partial block averages
    only its valid keys (kernels.visibility.pooled_keys)."""
    padding = op.Sub(op.Mul(num_blocks, _int(block)), keys)
    pads = op.Concat(_ints(0, 0, 0, 0), _as_1d(padding), _ints(0), axis=0)
    padded = op.Pad(k32, pads, _float(0.0))
    shape = op.Concat(op.Shape(k32, start=0, end=1), _as_1d(num_blocks), _ints(block),
                      op.Shape(k32, start=2, end=3), axis=0)
    sums = op.ReduceSum(op.Reshape(padded, shape), _ints(2), keepdims=0)
    block_starts = op.Mul(op.Range(_int(0), num_blocks, _int(1)), _int(block))
    counts = op.Min(_int(block), op.Sub(keys, block_starts))
    return op.Div(sums, op.Unsqueeze(_f32(counts), _ints(1)))


def _block_visibility(visible, keys, num_blocks, block: int):
    """[b,S,T] key visibility -> [b,S,nb] bool: a block is visible if any key in it is."""
    as_float = _f32(visible)
    padded = _pad_last_axis(as_float, op.Sub(op.Mul(num_blocks, _int(block)), keys), _float(0.0))
    blocks = op.ReduceMax(_split_blocks(padded, num_blocks, block), _ints(3), keepdims=0)
    return op.Cast(blocks, to=BOOL)


def _key_visibility(q, k, causal, key_start, key_end, mask):
    """(visible [b,S,T] bool or None, bias [B,S,T] or None) for every key."""
    return _visibility(_key_positions(_size(k, 1)), _size(q, 1), _size(k, 1), causal, key_start,
                       key_end, mask, mask is not None and _mask_is_bool(mask))


def _block_scores(q32, k32, keys, num_blocks, block: int):
    """ReLU(q . kbar) per head and key block: [B,S,H,nb]."""
    return _per_head_logits(q32, _pooled_keys(k32, keys, num_blocks, block))


# ---------------------------------------------------------------------------------------------
# The ops in standard ONNX


def dense_topk(q, k, w, k_top: int, scale: float = 1.0, causal: bool = True, key_start=None,
               key_end=None, mask=None, chunk: int = 0, q_scale=None, k_scale=None):
    scores = _sum_heads(_f32(w), _per_head_logits(_real(q, q_scale), _real(k, k_scale)))
    return _select_keys(scores, q, k, k_top, scale, causal, key_start, key_end, mask)


def _select_keys(scores, q, k, k_top, scale, causal, key_start, key_end, mask):
    """Visibility, then the top min(k_top, T) keys of scores [B,S,T]."""
    visible, bias = _key_visibility(q, k, causal, key_start, key_end, mask)
    scores = _finish_scores(scores, visible, bias, scale)
    keys = _size(k, 1)
    values, slots = _top_slots(scores, k_top, keys, _static_size(k, 1))
    if _static_size(k, 1) is None:
        # Padding slots can only surface past the visible keys; keep every index inside [0, T).
        slots = op.Min(slots, op.Sub(keys, _int(1)))
    return values, slots


def route_heads(q, k, w, active_heads: int, block_size: int = 1024, router: str = "score",
                causal: bool = True, key_start=None, key_end=None, mask=None, chunk: int = 0,
                q_scale=None, k_scale=None):
    q32 = _real(q, q_scale)
    if router == "qnorm":
        scores = op.ReduceL2(q32, _ints(-1), keepdims=0)
    else:
        k32 = _real(k, k_scale)
        keys = _size(k, 1)
        num_blocks = _num_blocks(keys, block_size)
        per_block = _block_scores(q32, k32, keys, num_blocks, block_size)  # [B,S,H,nb]
        visible, _ = _key_visibility(q, k, causal, key_start, key_end, mask)
        if visible is None:
            summed = op.ReduceSum(per_block, _ints(3), keepdims=0)
        else:
            blocks = _f32(_block_visibility(visible, keys, num_blocks, block_size))  # [b,S,nb]
            summed = op.Squeeze(op.MatMul(per_block, op.Unsqueeze(blocks, _ints(3))), _ints(3))
        scores = op.Mul(summed, op.Abs(_f32(w)))
    heads = _static_size(q, 2)
    _, chosen = _top_slots(_nan_to_num(scores), active_heads, _size(q, 2), heads)
    return chosen


def routed_topk(q, k, w, heads, k_top: int, scale: float = 1.0, causal: bool = True,
                key_start=None, key_end=None, mask=None, chunk: int = 0, q_scale=None,
                k_scale=None):
    # The key is shared by all heads, so routed scoring is the dense indexer on gathered heads.
    heads = op.Cast(heads, to=INT64)
    q_index = op.Expand(op.Unsqueeze(heads, _ints(3)),
                        op.Concat(op.Shape(heads), op.Shape(q, start=3, end=4), axis=0))
    q_routed = op.GatherElements(_real(q, q_scale), q_index, axis=2)
    w_routed = op.GatherElements(_f32(w), heads, axis=2)
    scores = _sum_heads(w_routed, _per_head_logits(q_routed, _real(k, k_scale)))
    return _select_keys(scores, q, k, k_top, scale, causal, key_start, key_end, mask)


def rerank_topk(q, k, w, candidates, k_top: int, scale: float = 1.0, causal: bool = True,
                key_start=None, key_end=None, mask=None, chunk: int = 0, q_scale=None,
                k_scale=None):
    keys = _size(k, 1)
    cand = op.Cast(candidates, to=INT64)  # [B,S,C]
    valid = op.And(op.GreaterOrEqual(cand, _int(0)), op.Less(cand, keys))
    safe = op.Min(op.Max(cand, _int(0)), op.Sub(keys, _int(1)))
    # k[b, safe[b,s,c]] through one flat Gather (portable; GatherND with batch dims is not).
    batch_offsets = op.Mul(op.Range(_int(0), _size(k, 0), _int(1)), keys)
    flat_ids = op.Add(safe, op.Unsqueeze(batch_offsets, _ints(1, 2)))
    flat_keys = op.Reshape(_real(k, k_scale),
                           op.Concat(_ints(-1), op.Shape(k, start=2, end=3), axis=0))
    cand_keys = op.Gather(flat_keys, flat_ids, axis=0)  # [B,S,C,D]
    logits = op.Relu(op.MatMul(_real(q, q_scale), op.Transpose(cand_keys, perm=[0, 1, 3, 2])))
    scores = _sum_heads(_f32(w), logits)  # [B,S,C]
    mask_at = None if mask is None else op.GatherElements(mask, safe, axis=2)
    visible, bias = _visibility(safe, _size(q, 1), keys, causal, key_start, key_end, mask_at,
                                mask is not None and _mask_is_bool(mask))
    visible = valid if visible is None else op.And(visible, valid)
    scores = _finish_scores(scores, visible, bias, scale)
    values, slots = _top_slots(scores, k_top, keys, _static_size(k, 1))
    # Slots past the C candidates are padding (at most k_top of them): their value is -inf and
    # their index 0, as the torch implementation fills them.
    zeros = op.Expand(_int(0), op.Concat(op.Shape(safe, start=0, end=2), _ints(k_top), axis=0))
    padded_safe = op.Concat(safe, zeros, axis=-1)
    return values, op.GatherElements(padded_safe, slots, axis=2)


def hisa_candidates(q, k, w, block_size: int = 128, num_blocks: int = 64, causal: bool = True,
                    key_start=None, key_end=None, mask=None, chunk: int = 0, q_scale=None,
                    k_scale=None):
    keys = _size(k, 1)
    static_keys = _static_size(k, 1)
    if static_keys is not None and num_blocks * block_size >= static_keys:
        # Every block is kept, so every key is a candidate, as the op returns it
        # (kernels/torch_impl.every_key_kept): no scores, and no ids sized by the block.
        ids = op.Reshape(op.Range(_int(0), keys, _int(1)), _ints(1, 1, -1))
        return op.Expand(ids, op.Concat(op.Shape(q, start=0, end=2), _as_1d(keys), axis=0))
    k32 = _real(k, k_scale)
    total_blocks = _num_blocks(keys, block_size)
    per_block = _block_scores(_real(q, q_scale), k32, keys, total_blocks, block_size)
    beta = _nan_to_num(_sum_heads(_f32(w), per_block))  # [B,S,nb]
    visible, _ = _key_visibility(q, k, causal, key_start, key_end, mask)
    if visible is not None:
        blocks_visible = _block_visibility(visible, keys, total_blocks, block_size)
        beta = op.Where(blocks_visible, beta, _float(NEG_INF))
        beta = _force_first_and_last_blocks(beta, blocks_visible, total_blocks)
    else:
        beta = _force_first_and_last_blocks(beta, None, total_blocks)
    static_blocks = None if static_keys is None else -(-static_keys // block_size)
    _, chosen = _top_slots(beta, num_blocks, total_blocks, static_blocks)
    offsets = op.Range(_int(0), _int(block_size), _int(1))
    key_ids = op.Add(op.Mul(op.Unsqueeze(chosen, _ints(3)), _int(block_size)), offsets)
    key_ids = op.Reshape(key_ids, op.Concat(op.Shape(chosen, start=0, end=2), _ints(-1), axis=0))
    key_ids = op.Where(op.Less(key_ids, keys), key_ids, _int(-1))
    if static_keys is not None:
        return key_ids
    # T known only at run time: the op's width is min(min(m, nb) * block, T), and when the m
    # blocks are all nb blocks its ids are every key in order (torch_impl.every_key_kept). The
    # two cases agree in shape once the block ids are cut to that width, so a Where picks.
    width = op.Min(op.Mul(op.Min(_int(num_blocks), total_blocks), _int(block_size)), keys)
    listed = op.Slice(key_ids, _ints(0), _as_1d(width), _ints(2))
    every_key = op.Expand(op.Reshape(op.Range(_int(0), width, _int(1)), _ints(1, 1, -1)),
                          op.Shape(listed))
    all_kept = op.GreaterOrEqual(op.Mul(_int(num_blocks), _int(block_size)), keys)
    return op.Where(all_kept, every_key, listed)


def _force_first_and_last_blocks(beta, blocks_visible, total_blocks):
    """HISA always keeps the first visible block (the attention sink) and the last one (the
    query's own block): their score becomes +inf. Rows with no visible block stay all -inf."""
    block_ids = op.Range(_int(0), total_blocks, _int(1))
    if blocks_visible is None:
        forced = op.Or(op.Equal(block_ids, _int(0)),
                       op.Equal(block_ids, op.Sub(total_blocks, _int(1))))
    else:
        first = op.ReduceMin(op.Where(blocks_visible, block_ids, total_blocks), _ints(2),
                             keepdims=1)
        last = op.ReduceMax(op.Where(blocks_visible, block_ids, _int(-1)), _ints(2), keepdims=1)
        forced = op.Or(op.Equal(block_ids, first), op.Equal(block_ids, last))
    return op.Where(forced, _float(POS_INF), beta)


# ---------------------------------------------------------------------------------------------
# Custom-domain nodes ("misa" domain) for runtimes with plugins


def _schema(name: str, doc: str, extra_inputs: list, outputs: list, attributes: list):
    param = defs.OpSchema.FormalParameter
    optional = defs.OpSchema.FormalParameterOption.Optional
    attr = defs.OpSchema.Attribute
    visibility_attrs = [attr("causal", defs.OpSchema.AttrType.INT,
                             "1: end-aligned causal visibility (query i of S sees keys "
                             "[0, T-S+i])")]
    return defs.OpSchema(
        name, MISA_DOMAIN, MISA_DOMAIN_VERSION, doc=doc,
        inputs=[param("q", "T", "index queries [B,S,H,D]"),
                param("k", "T", "index keys [B,T,D], shared by all heads"),
                param("w", "T", "per-head weights [B,S,H]"),
                *extra_inputs,
                param("key_start", "I", "ragged range start [B,S]", param_option=optional),
                param("key_end", "I", "ragged range end (exclusive) [B,S]", param_option=optional),
                param("mask", "M", "[B,S,T] bool (true = visible) or additive float",
                      param_option=optional)],
        outputs=outputs,
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "query/key dtype"),
            ("I", ["tensor(int32)", "tensor(int64)"], "index dtype"),
            ("M", ["tensor(bool)", "tensor(float)", "tensor(float16)", "tensor(bfloat16)"],
             "mask dtype")],
        attributes=[*attributes, *visibility_attrs])


def _build_schemas() -> dict[str, defs.OpSchema]:
    param = defs.OpSchema.FormalParameter
    attr = defs.OpSchema.Attribute
    ints, floats, strings = (defs.OpSchema.AttrType.INT, defs.OpSchema.AttrType.FLOAT,
                             defs.OpSchema.AttrType.STRING)
    selection = [param("values", "tensor(float)", "[B,S,min(k_top,T)], -inf past visible keys"),
                 param("indices", "tensor(int64)", "[B,S,min(k_top,T)] key ids")]
    scored = [attr("k_top", ints, "keys selected per query"),
              attr("scale", floats, "positive factor on the index score")]
    return {
        "DenseTopK": _schema("DenseTopK", "DSA lightning indexer with all heads, then top-k.",
                             [], selection, scored),
        "RouteHeads": _schema(
            "RouteHeads", "MISA router: the active_heads heads per query.", [],
            [param("heads", "tensor(int64)", "[B,S,active_heads] head ids")],
            [attr("active_heads", ints, "heads kept per query"),
             attr("block_size", ints, "keys pooled per router block"),
             attr("router", strings, "'score' or 'qnorm'")]),
        "RoutedTopK": _schema(
            "RoutedTopK", "Index score over each query's routed heads, then top-k.",
            [param("heads", "I", "[B,S,h] routed head ids")], selection, scored),
        "RerankTopK": _schema(
            "RerankTopK", "Exact all-head scores of candidate keys, then top-k among them.",
            [param("candidates", "I", "[B,S,C] key ids; outside [0,T) ignored")], selection,
            scored),
        "HisaCandidates": _schema(
            "HisaCandidates", "HISA block filter: key ids of the kept blocks.", [],
            [param("candidates", "tensor(int64)", "[B,S,min(m,ceil(T/block))*block], -1 past T")],
            [attr("block_size", ints, "keys per block"),
             attr("num_blocks", ints, "blocks kept per query")]),
    }


MISA_SCHEMAS = _build_schemas()


def register_misa_schemas() -> None:
    """Registers the "misa" domain schemas with onnx.defs once (onnx.checker and onnxscript look
    them up there)."""
    for name, schema in MISA_SCHEMAS.items():
        if not defs.has(name, MISA_DOMAIN):
            defs.register_schema(schema)


_MISA = onnxscript.values.Opset(MISA_DOMAIN, MISA_DOMAIN_VERSION)


def _refuse_quantized(node: str, q, k, q_scale, k_scale) -> None:
    """The misa-domain schemas have no scale inputs and type q, k, w alike, so FP8 inputs and
    dequantization scales have no spelling there."""
    for name, value in (("q_scale", q_scale), ("k_scale", k_scale)):
        if value is not None:
            raise NotImplementedError(
                f"misa ONNX custom domain: {node} has no {name} input; export with "
                "custom_domain=False (standard ONNX dequantizes with Cast and Mul)")
    for name, value in (("q", q), ("k", k)):
        dtype = getattr(value, "dtype", None)
        if dtype is not None and int(dtype) == onnx.TensorProto.FLOAT8E4M3FN:
            raise NotImplementedError(
                f"misa ONNX custom domain: {node} takes float, float16 or bfloat16 {name}, got "
                "float8e4m3fn; export with custom_domain=False")


def _custom_dense_topk(q, k, w, k_top, scale=1.0, causal=True, key_start=None, key_end=None,
                       mask=None, chunk=0, q_scale=None, k_scale=None):
    _refuse_quantized("DenseTopK", q, k, q_scale, k_scale)
    return _MISA.DenseTopK(q, k, w, key_start, key_end, mask, k_top=k_top, scale=float(scale),
                           causal=int(causal))


def _custom_route_heads(q, k, w, active_heads, block_size=1024, router="score", causal=True,
                        key_start=None, key_end=None, mask=None, chunk=0, q_scale=None,
                        k_scale=None):
    _refuse_quantized("RouteHeads", q, k, q_scale, k_scale)
    return _MISA.RouteHeads(q, k, w, key_start, key_end, mask, active_heads=active_heads,
                            block_size=block_size, router=router, causal=int(causal))


def _custom_routed_topk(q, k, w, heads, k_top, scale=1.0, causal=True, key_start=None,
                        key_end=None, mask=None, chunk=0, q_scale=None, k_scale=None):
    _refuse_quantized("RoutedTopK", q, k, q_scale, k_scale)
    return _MISA.RoutedTopK(q, k, w, heads, key_start, key_end, mask, k_top=k_top,
                            scale=float(scale), causal=int(causal))


def _custom_rerank_topk(q, k, w, candidates, k_top, scale=1.0, causal=True, key_start=None,
                        key_end=None, mask=None, chunk=0, q_scale=None, k_scale=None):
    _refuse_quantized("RerankTopK", q, k, q_scale, k_scale)
    return _MISA.RerankTopK(q, k, w, candidates, key_start, key_end, mask, k_top=k_top,
                            scale=float(scale), causal=int(causal))


def _custom_hisa_candidates(q, k, w, block_size=128, num_blocks=64, causal=True, key_start=None,
                            key_end=None, mask=None, chunk=0, q_scale=None, k_scale=None):
    _refuse_quantized("HisaCandidates", q, k, q_scale, k_scale)
    return _MISA.HisaCandidates(q, k, w, key_start, key_end, mask, block_size=block_size,
                                num_blocks=num_blocks, causal=int(causal))


def translation_table(custom_domain: bool = False) -> dict[Callable, Callable]:
    """{torch.ops.misa.X.default: translation} for torch.onnx.export's custom_translation_table.
    Standard ONNX operators by default; one "misa"-domain node per op with custom_domain=True."""
    ops = torch.ops.misa
    if custom_domain:
        register_misa_schemas()
        return {ops.dense_topk.default: _custom_dense_topk,
                ops.route_heads.default: _custom_route_heads,
                ops.routed_topk.default: _custom_routed_topk,
                ops.rerank_topk.default: _custom_rerank_topk,
                ops.hisa_candidates.default: _custom_hisa_candidates}
    return {ops.dense_topk.default: dense_topk,
            ops.route_heads.default: route_heads,
            ops.routed_topk.default: routed_topk,
            ops.rerank_topk.default: rerank_topk,
            ops.hisa_candidates.default: hisa_candidates}
