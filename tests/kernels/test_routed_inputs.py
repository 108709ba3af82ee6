"""The routed op's input kernel (kernels/triton/scoring/routed_inputs.py), run by Triton's CPU
interpreter: bit for bit what the torch steps it replaced computed (head range check, clamp,
w * q_scale, the gather of q and w, scale_faults' rule over the whole q_scale row), for every q
dtype FP8 included, with and without q_scale, over bad head ids and bad scales; and the ops that
launch it poison exactly the rows those steps poisoned."""
import os

import pytest
import torch

from misa_compile.kernels import torch_impl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not INTERPRET, reason="CPU interpreter tests")

if INTERPRET:
    from misa_compile.kernels.triton.launch.device_checks import (either, fold_query_scale,
                                                                  scale_faults)
    from misa_compile.kernels.triton.launch.paged_decode_topk import paged_decode_topk_op
    from misa_compile.kernels.triton.launch.route_heads import route_heads_op
    from misa_compile.kernels.triton.launch.routed_topk import routed_topk_op
    from misa_compile.kernels.triton.scoring.routed_inputs import routed_inputs

FP8 = torch.float8_e4m3fn
BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
BAD_SCALES = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, -1.0]


def old_steps(q, w, heads, q_scale):
    """What routed_topk_op and scored_topk.gather_routed did in torch before the kernel."""
    num_heads = q.shape[2]
    bad_head = ((heads < 0) | (heads >= num_heads)).any(-1)
    q_routed, w_routed = torch_impl.gather_heads(q, fold_query_scale(w, q_scale),
                                                 heads.clamp(0, num_heads - 1))
    return q_routed, w_routed, either(bad_head, scale_faults(q_scale, None))


def bits(t):
    return t.contiguous().view(BITS[t.element_size()])


def assert_same_as_old_steps(q, w, heads, q_scale):
    q_routed, w_routed, faults = routed_inputs(q, w, heads, q_scale)
    want_q, want_w, want_faults = old_steps(q, w, heads, q_scale)
    assert q_routed.dtype == q.dtype and q_routed.is_contiguous()
    assert torch.equal(bits(q_routed), bits(want_q))
    # fp32 always: the scoring kernels read w as fp32, so a 16-bit w converts exactly.
    assert w_routed.dtype == torch.float32
    assert torch.equal(bits(w_routed), bits(want_w.float()))
    assert faults.dtype == torch.bool and torch.equal(faults, want_faults)
    return faults


def inputs(batch, queries, num_heads, dim, q_dtype, w_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, queries, num_heads, dim, generator=gen) * 4
    if q_dtype == FP8:
        q = q.to(FP8)
        raw = q.view(torch.uint8)
        # Bytes a float conversion could change: both NaNs and negative zero.
        raw[0, 0, :, :3] = torch.tensor([0x7F, 0xFF, 0x80], dtype=torch.uint8)
    else:
        q = q.to(q_dtype)
    w = torch.randn(batch, queries, num_heads, generator=gen).to(w_dtype)
    q_scale = torch.rand(batch, queries, num_heads, generator=gen) + 0.5
    return q, w, q_scale, gen


@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16, torch.float32, FP8],
                         ids=str)
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("scaled", [False, True], ids=["no_q_scale", "q_scale"])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32], ids=str)
def test_bit_exact_against_the_torch_steps(q_dtype, w_dtype, scaled, id_dtype):
    B, S, H, h, D = 2, 12, 6, 3, 20
    q, w, q_scale, gen = inputs(B, S, H, D, q_dtype, w_dtype, seed=1)
    heads = torch.randint(0, H, (B, S, h), generator=gen).to(id_dtype)
    heads[0, 1, 0] = -1  # route_heads' poisoned rows
    heads[0, 2, 2] = H  # one past the last head
    heads[1, 3, 1] = H - 1  # the last head: fine
    heads[1, 4, 0] = 0  # the first head: fine
    # Large: an int64 id must not wrap into range in 32 bits (2^32 + 1 would read as 1).
    heads[1, 5, 1] = 2 ** 32 + 1 if id_dtype == torch.int64 else torch.iinfo(id_dtype).max
    heads[1, 6, 2] = torch.iinfo(id_dtype).min
    bad_heads = {(0, 1), (0, 2), (1, 5), (1, 6)}
    # Bad scales at heads that the row routes and at heads it does not: the whole row counts.
    for (b, t), bad in zip([(0, 7), (0, 8), (0, 9), (1, 7), (1, 8), (1, 9)], BAD_SCALES):
        q_scale[b, t, (t * 5) % H] = bad
    heads[0, 7] = torch.tensor([0, 1, 2])
    heads[0, 8] = torch.tensor([3, 4, 5])  # routes head 40 % 6 = 4, whose scale is bad
    # Edge values that are fine: the smallest subnormal and the largest finite fp32.
    q_scale[1, 10, 0] = torch.finfo(torch.float32).tiny / 2 ** 23
    q_scale[1, 11, 1] = torch.finfo(torch.float32).max
    faults = assert_same_as_old_steps(q, w, heads, q_scale if scaled else None)
    scale_rows = {(0, 7), (0, 8), (0, 9), (1, 7), (1, 8), (1, 9)} if scaled else set()
    assert {tuple(x) for x in faults.nonzero().tolist()} == bad_heads | scale_rows


@pytest.mark.parametrize("bad", BAD_SCALES, ids=str)
def test_every_bad_scale_value_is_a_fault_of_its_row_only(bad):
    q, w, q_scale, gen = inputs(1, 4, 5, 8, torch.bfloat16, torch.bfloat16, seed=2)
    heads = torch.tensor([0, 1]).expand(1, 4, 2)
    q_scale[0, 2, 4] = bad  # a head no row routes
    faults = assert_same_as_old_steps(q, w, heads, q_scale)
    assert faults.tolist() == [[False, False, True, False]]


def test_strided_inputs_long_rows_and_many_heads():
    # q and w as views with non-unit strides, a head dim longer than one step of the row (16
    # routed heads: 64 dims a step), and H past one block of the scale check (1024).
    B, S, H, h, D = 1, 3, 1100, 16, 80
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(B, H, S, D, generator=gen).bfloat16().transpose(1, 2)
    w = torch.randn(B, S, H, 2, generator=gen)[..., 0]
    q_scale = (torch.rand(B, H, S, generator=gen) + 0.5).transpose(1, 2)
    heads = torch.randint(0, H, (B, h, S), generator=gen).transpose(1, 2)
    q_scale[0, 1, 1090] = float("nan")  # in the second block of the check
    faults = assert_same_as_old_steps(q, w, heads, q_scale)
    assert faults.tolist() == [[False, True, False]]
    assert not assert_same_as_old_steps(q, w, heads, None).any()


B, S, T, H, D = 1, 8, 64, 4, 16


def make(seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, S, H, D, generator=gen), torch.randn(B, T, D, generator=gen),
            torch.randn(B, S, H, generator=gen), gen)


def test_routed_topk_poisons_the_rows_route_heads_poisoned():
    # A bad q_scale makes route_heads return -1 heads; routed_topk without that scale must still
    # poison those rows, for their -1 heads alone.
    q, k, w, _ = make(4)
    q_scale = torch.rand(B, S, H) + 0.5
    q_scale[0, 5, 3] = float("nan")
    heads = route_heads_op(q, k, w, 2, 16, True, None, None, None, q_scale)
    assert (heads[0, 5] == -1).all()
    values, indices = routed_topk_op(q, k, w, heads, 6, 1.0, True, None, None, None)
    assert values[0, 5].isnan().all() and (indices[0, 5] == -1).all()
    rest = [0, 1, 2, 3, 4, 6, 7]
    assert not values[0, rest].isnan().any() and (indices[0, rest] >= 0).all()


def test_routed_topk_poisons_q_scale_rows_and_k_scale_sequences():
    q, k, w, gen = make(5)
    heads = torch.randint(0, H, (B, S, 2), generator=gen)
    q_scale, k_scale = torch.rand(B, S, H) + 0.5, torch.rand(B, T) + 0.5
    q_scale[0, 2, 1] = 0.0
    values, indices = routed_topk_op(q, k, w, heads, 6, 1.0, True, None, None, None, 0, q_scale,
                                     k_scale)
    poisoned = values.isnan().all(-1) & (indices == -1).all(-1)
    assert poisoned.tolist() == [[False, False, True] + [False] * 5]
    assert not values[~poisoned].isnan().any()
    k_scale[0, 9] = float("inf")
    values, indices = routed_topk_op(q, k, w, heads, 6, 1.0, True, None, None, None, 0, q_scale,
                                     k_scale)
    assert values.isnan().all() and (indices == -1).all()


@pytest.mark.parametrize("active_heads", [0, 2])
def test_paged_decode_poisons_bad_q_scale_rows_dense_and_routed(active_heads):
    gen = torch.Generator().manual_seed(6)
    batch, page, pages = 3, 8, 4
    q = torch.randn(batch, H, D, generator=gen)
    k_cache = torch.randn(batch * pages, page, D, generator=gen)
    w = torch.randn(batch, H, generator=gen)
    table = torch.arange(batch * pages).view(batch, pages)
    seq_lens = torch.tensor([32, 20, 9])
    q_scale = torch.rand(batch, H, generator=gen) + 0.5
    args = (k_cache, w, table, seq_lens, 6, active_heads, 8, 1.0)
    good_v, good_i = paged_decode_topk_op(q, *args, q_scale)
    q_scale[1, 3] = -2.0
    values, indices = paged_decode_topk_op(q, *args, q_scale)
    assert values[1].isnan().all() and (indices[1] == -1).all()
    for b in (0, 2):
        assert torch.equal(values[b], good_v[b]) and torch.equal(indices[b], good_i[b])
