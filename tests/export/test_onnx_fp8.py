"""Dequantization scales in the ONNX translation: each misa op given q_scale / k_scale (on FP8 e4m3
q and k, and on fp32 ones) exports to standard ONNX (a Cast and a Mul before the usual math) and
runs in ONNX Runtime with the torch ops' results, ties aside. The "misa" custom domain has no
scale inputs and no FP8 type: those exports fail naming the argument."""
from __future__ import annotations

import onnx
import onnxruntime
import pytest
import torch
from torch import Tensor, nn

import misa_compile
from misa_compile.kernels import reference
from misa_compile.onnx_export import OnnxExportError

from .onnx_cases import (ACTIVE_HEADS, DIM, HEADS, HISA_BLOCK, K_TOP, ROUTER_BLOCK, SCALE,
                         assert_same_heads, assert_same_hisa_candidates, assert_same_selection,
                         hisa_block_scores)

FP8 = torch.float8_e4m3fn
# Enough key blocks that the block scores, not only the forced first and last blocks, decide.
KEYS, HISA_BLOCKS = 40, 5
OUTPUTS = ("dense_topk", "route_heads", "routed_topk", "rerank_topk", "hisa_candidates")


class ScaledOps(nn.Module):
    """Every misa op once, causal, with both dequantization scales."""

    def forward(self, q: Tensor, k: Tensor, w: Tensor, heads: Tensor, candidates: Tensor,
                q_scale: Tensor, k_scale: Tensor) -> dict[str, tuple[Tensor, ...]]:
        ops = torch.ops.misa
        scales = dict(q_scale=q_scale, k_scale=k_scale)
        return {
            "dense_topk": ops.dense_topk(q, k, w, K_TOP, SCALE, True, **scales),
            "route_heads": (ops.route_heads(q, k, w, ACTIVE_HEADS, ROUTER_BLOCK, "score", True,
                                           **scales),),
            "routed_topk": ops.routed_topk(q, k, w, heads, K_TOP, SCALE, True, **scales),
            "rerank_topk": ops.rerank_topk(q, k, w, candidates, K_TOP, SCALE, True, **scales),
            "hisa_candidates": (ops.hisa_candidates(q, k, w, HISA_BLOCK, HISA_BLOCKS, True,
                                                   **scales),),
        }


def scaled_inputs(dtype: torch.dtype, batch: int = 2, queries: int = 6, keys: int = KEYS,
                  seed: int = 0) -> tuple[Tensor, ...]:
    """(q, k, w, heads, candidates, q_scale, k_scale); q_scale spreads over 2^-3..2^3, k_scale
    over 2^-6..2^6. k is positive and q signed, so the ReLU is active and the scales reorder the
    router's heads."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, queries, HEADS, DIM, generator=gen)
    k = torch.rand(batch, keys, DIM, generator=gen) + 0.05
    w = torch.randn(batch, queries, HEADS, generator=gen)
    q_scale = torch.exp2(torch.randint(-3, 4, (batch, queries, HEADS), generator=gen).float())
    k_scale = torch.exp2(torch.randint(-6, 7, (batch, keys), generator=gen).float()) * 0.7
    heads = torch.rand(batch, queries, HEADS, generator=gen).argsort(-1)[..., :ACTIVE_HEADS]
    candidates = torch.rand(batch, queries, keys + 1, generator=gen).argsort(-1)[..., :6] - 1
    return q.to(dtype), k.to(dtype), w, heads, candidates, q_scale, k_scale


def run_onnx(model: onnx.ModelProto, inputs: tuple[Tensor, ...]) -> list[Tensor]:
    """ONNX Runtime on inputs that may be FP8 (fed as raw bytes typed FLOAT8E4M3FN: numpy has no
    FP8 dtype)."""
    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    feeds = {}
    for spec, tensor in zip(session.get_inputs(), inputs):
        if tensor.dtype == FP8:
            feeds[spec.name] = onnxruntime.OrtValue.ortvalue_from_numpy_with_onnx_type(
                tensor.view(torch.uint8).numpy(), onnx.TensorProto.FLOAT8E4M3FN)
        else:
            feeds[spec.name] = onnxruntime.OrtValue.ortvalue_from_numpy(tensor.numpy())
    return [torch.from_numpy(out.numpy()) for out in session.run_with_ort_values(None, feeds)]


@pytest.mark.parametrize("dtype", [FP8, torch.float32])
def test_scaled_ops_run_in_onnx_runtime(dtype):
    inputs = scaled_inputs(dtype)
    q, k, w, _, _, q_scale, k_scale = inputs
    model = misa_compile.to_onnx(torch.export.export(ScaledOps(), inputs))
    flat = run_onnx(model, inputs)
    got = {"dense_topk": flat[0:2], "route_heads": flat[2:3], "routed_topk": flat[3:5],
           "rerank_topk": flat[5:7], "hisa_candidates": flat[7:8]}
    assert len(flat) == 8
    want = ScaledOps()(*inputs)
    keys = k.shape[1]
    for name in ("dense_topk", "routed_topk", "rerank_topk"):
        assert_same_selection(*got[name], *want[name], keys=keys, label=name)
    scales = dict(q_scale=q_scale, k_scale=k_scale)
    router = reference.router_scores(q, k, w, ROUTER_BLOCK, True, **scales)
    assert_same_heads(got["route_heads"][0], want["route_heads"][0], router, "route_heads")
    q_real, k_real = reference.dequantized(q, k, q_scale, k_scale)
    blocks = hisa_block_scores(q_real, k_real, w, True, None, None, None)
    assert_same_hisa_candidates(got["hisa_candidates"][0], want["hisa_candidates"][0], blocks,
                                keys, "hisa_candidates")
    # The scales matter on these inputs: without them every op's first output (the values of
    # a selection, the ids of heads or blocks) differs.
    unscaled = ScaledOps()(q, k, w, *inputs[3:5], None, None)
    for name in OUTPUTS:
        assert not torch.equal(unscaled[name][0].sort(-1).values,
                               want[name][0].sort(-1).values), name


class DenseOnly(nn.Module):
    def forward(self, q, k, w, q_scale=None, k_scale=None):
        return torch.ops.misa.dense_topk(q, k, w, K_TOP, SCALE, True, q_scale=q_scale,
                                         k_scale=k_scale)


@pytest.mark.parametrize("dtype,scaled,message", [
    (torch.float32, True, "DenseTopK has no q_scale input; export with custom_domain=False"),
    (FP8, False, "DenseTopK takes float, float16 or bfloat16 q, got float8e4m3fn"),
])
def test_custom_domain_refuses_scales_and_fp8(dtype, scaled, message):
    q, k, w, _, _, q_scale, k_scale = scaled_inputs(dtype)
    args = (q, k, w, q_scale, k_scale) if scaled else (q, k, w)
    program = torch.export.export(DenseOnly(), args)
    with pytest.raises(OnnxExportError, match=message) as error:
        misa_compile.to_onnx(program, custom_domain=True)
    root = error.value
    while root.__cause__ is not None:
        root = root.__cause__
    assert isinstance(root, NotImplementedError)
