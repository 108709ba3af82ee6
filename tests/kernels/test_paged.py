"""misa::paged_decode_topk: decode over a paged key cache.

Checked on the default (torch) implementation: the op equals the contiguous ops on the gathered
keys (dense, and MISA wherever every sequence's last router block is full) and is a top-k of the
float64 reference scores of those keys; MISA routes each sequence on its own keys [0, seq_len)
(its last partial block averages written keys only: garbage in unwritten slots changes nothing);
shuffled page tables with -1 padding past each sequence's pages; ragged lengths, a length of 0
(all -inf) and lengths below k_top; FP8 inputs with scales; the validation errors; opcheck and a
dynamic-shape compile. Under TRITON_INTERPRET=1, the Triton path (the CUDA registration run on
CPU tensors) against the same references, and the paged pooled keys. Selections are compared by
gathered reference scores or as sets, never by index order."""
from __future__ import annotations

import os
import re

import pytest
import torch
import torch._dynamo.testing

from misa_compile.kernels import reference

from .strategies import assert_valid_topk
from .test_device_checks import BAD_SCALES

ops = torch.ops.misa
FP8 = torch.float8_e4m3fn
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
NEG_INF = float("-inf")
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor",
                 "test_aot_dispatch_static", "test_aot_dispatch_dynamic")


def paged_site(seq_lens, page=16, pages=6, heads=8, dim=16, spare_pages=3, seed=0,
               dtype=torch.float32):
    """q [B,H,D], k_cache [P, page, D], w [B,H], block_table int32 [B, pages], seq_lens int64:
    every sequence owns distinct pages in shuffled order; table entries past its pages are -1."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(seq_lens)
    seq_lens = torch.tensor(seq_lens)
    num_pages = batch * pages + spare_pages
    q = torch.randn(batch, heads, dim, generator=gen).to(dtype)
    w = torch.randn(batch, heads, generator=gen).to(dtype)
    k_cache = torch.randn(num_pages, page, dim, generator=gen).to(dtype)
    owners = torch.randperm(num_pages, generator=gen)[:batch * pages].view(batch, pages)
    used = torch.arange(pages) * page < seq_lens[:, None]
    block_table = torch.where(used, owners, -1).int()
    return q, k_cache, w, block_table, seq_lens


def gathered(k_cache, block_table, seq_lens, k_scale=None):
    """float64 contiguous keys [B, pages * page, D] (dequantized by k_scale), one position at a
    time from the definition; positions past seq_len are zero (they are hidden)."""
    batch, pages = block_table.shape
    page = k_cache.shape[1]
    k = torch.zeros(batch, pages * page, k_cache.shape[2], dtype=torch.float64)
    for b in range(batch):
        for n in range(int(seq_lens[b])):
            slot = (int(block_table[b, n // page]), n % page)
            scale = 1.0 if k_scale is None else float(k_scale[slot])
            k[b, n] = k_cache[slot].double() * scale
    return k


def contiguous_args(q, w, seq_lens):
    """q [B,1,H,D], w [B,1,H] and the visibility of decode over keys [0, seq_len)."""
    key_end = seq_lens[:, None]
    return q[:, None], w[:, None], dict(causal=False, key_start=torch.zeros_like(key_end),
                                        key_end=key_end)


def reference_heads(q, k, w, seq_lens, active_heads, block_size, q_scale=None):
    """int64 [B,1,h]: each sequence's float64 router over its own keys [0, seq_len)."""
    heads = []
    for b, length in enumerate(seq_lens.tolist()):
        qb = q[b:b + 1, None].double()
        if q_scale is not None:
            qb = qb * q_scale[b:b + 1, None, :, None].double()
        r = reference.router_scores(qb, k[b:b + 1, :max(length, 1)], w[b:b + 1, None],
                                    block_size, causal=False)
        heads.append(r.topk(active_heads, dim=-1).indices)
    return torch.cat(heads)


def reference_scores(q, k, w, seq_lens, scale, heads=None, q_scale=None):
    """float64 [B, T] index scores of the gathered keys k, -inf past seq_len."""
    q1, w1, vis = contiguous_args(q.double(), w, seq_lens)
    if q_scale is not None:
        q1 = q1 * q_scale[:, None, :, None].double()
    if heads is None:
        return reference.dense_scores(q1, k, w1, scale, **vis)[:, 0]
    return reference.routed_scores(q1, k, w1, heads, scale, **vis)[:, 0]


def assert_selects_reference(values, indices, scores, k_top, rel_tol=1e-5):
    K = min(k_top, scores.shape[-1])
    assert values.shape == indices.shape == (scores.shape[0], K)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert_valid_topk(indices, scores, k_top, values, rel_tol=rel_tol)


def finite_sets(values, indices):
    return [frozenset(i[torch.isfinite(v)].tolist()) for v, i in zip(values, indices)]


# Ragged lengths: a full sequence, one of 0, one below k_top, one ending inside a page.
SEQ_LENS = (96, 0, 7, 53)


@pytest.mark.parametrize("k_top", [10, 200])
def test_dense_equals_the_contiguous_op(k_top):
    q, k_cache, w, table, seq_lens = paged_site(SEQ_LENS)
    values, indices = ops.paged_decode_topk(q, k_cache, w, table, seq_lens, k_top, scale=0.5)
    k = gathered(k_cache, table, seq_lens)
    q1, w1, vis = contiguous_args(q, w, seq_lens)
    want_values, want_indices = ops.dense_topk(q1, k.float(), w1, k_top, 0.5, **vis)
    assert torch.equal(values.sort(-1).values, want_values[:, 0].sort(-1).values)
    assert finite_sets(values, indices) == finite_sets(want_values[:, 0], want_indices[:, 0])
    assert_selects_reference(values, indices, reference_scores(q, k, w, seq_lens, 0.5), k_top)
    assert not torch.isfinite(values[1]).any()
    assert torch.isfinite(values).sum(-1).tolist() == [min(k_top, n) for n in SEQ_LENS]


@pytest.mark.parametrize("active_heads", [1, 3])
def test_misa_is_a_top_k_under_each_sequences_own_router(active_heads):
    q, k_cache, w, table, seq_lens = paged_site(SEQ_LENS, seed=1)
    values, indices = ops.paged_decode_topk(q, k_cache, w, table, seq_lens, 10, active_heads,
                                            block_size=32)
    k = gathered(k_cache, table, seq_lens)
    heads = reference_heads(q, k, w, seq_lens, active_heads, 32)
    assert_selects_reference(values, indices, reference_scores(q, k, w, seq_lens, 1.0, heads),
                             10)
    assert not torch.isfinite(values[1]).any()


def test_misa_equals_the_contiguous_ops_when_router_blocks_are_full():
    """Lengths that end on a router block boundary: route_heads + routed_topk on the gathered
    keys is then exactly the op."""
    lengths = (96, 64, 32)
    q, k_cache, w, table, seq_lens = paged_site(lengths, seed=2)
    values, indices = ops.paged_decode_topk(q, k_cache, w, table, seq_lens, 12, 3, 32)
    q1, w1, vis = contiguous_args(q, w, seq_lens)
    k = gathered(k_cache, table, seq_lens).float()
    heads = ops.route_heads(q1, k, w1, 3, 32, **vis)
    want_values, want_indices = ops.routed_topk(q1, k, w1, heads, 12, **vis)
    assert torch.equal(values.sort(-1).values, want_values[:, 0].sort(-1).values)
    assert finite_sets(values, indices) == finite_sets(want_values[:, 0], want_indices[:, 0])


@pytest.mark.parametrize("active_heads", [0, 3])
def test_unwritten_slots_and_unused_pages_change_nothing(active_heads):
    """Garbage in the slots past seq_len of a sequence's last page, and in pages it does not
    use, never reaches a score or a router block mean."""
    q, k_cache, w, table, seq_lens = paged_site((53, 40), seed=3)
    clean = ops.paged_decode_topk(q, k_cache, w, table, seq_lens, 10, active_heads, 32)
    dirty = k_cache.clone()
    dirty[table[0, 3], 53 % 16:] = 1e4
    dirty[table[1, 2], 40 % 16:] = -1e4
    unused = torch.ones(k_cache.shape[0], dtype=torch.bool)
    unused[table[table >= 0].long()] = False
    dirty[unused] = 1e4
    got = ops.paged_decode_topk(q, dirty, w, table, seq_lens, 10, active_heads, 32)
    assert torch.equal(got[0].sort(-1).values, clean[0].sort(-1).values)
    assert finite_sets(*got) == finite_sets(*clean)


def test_misa_with_every_head_equals_dense():
    q, k_cache, w, table, seq_lens = paged_site(SEQ_LENS, seed=4)
    dense = ops.paged_decode_topk(q, k_cache, w, table, seq_lens, 10)
    misa = ops.paged_decode_topk(q, k_cache, w, table, seq_lens, 10, 8, 32)
    # The routed heads come in router order: the head sum may round differently.
    torch.testing.assert_close(dense[0].sort(-1).values, misa[0].sort(-1).values)
    assert finite_sets(*dense) == finite_sets(*misa)


def test_k_top_above_the_cache_capacity():
    q, k_cache, w, table, seq_lens = paged_site((96, 20), pages=6)
    values, indices = ops.paged_decode_topk(q, k_cache, w, table, seq_lens, 500)
    assert values.shape == (2, 96)
    assert torch.isfinite(values).sum(-1).tolist() == [96, 20]
    assert ((indices >= 0) & (indices < 96)).all()


def quantize_rows(x, gen):
    """(x8, scale) per row of the last axis after a random gain, so that dropped scales show."""
    gain = torch.exp2(torch.randint(-4, 5, x.shape[:-1], generator=gen).float())
    x = x.float() * gain[..., None]
    scale = (x.abs().amax(-1) / torch.finfo(FP8).max).clamp_min(1e-6)
    return (x / scale[..., None]).to(FP8), scale


def fp8_site(seq_lens, seed=5):
    q, k_cache, w, table, seq_lens = paged_site(seq_lens, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    q8, q_scale = quantize_rows(q, gen)
    k8, k_scale = quantize_rows(k_cache, gen)
    return q8, k8, w, table, seq_lens, q_scale, k_scale


@pytest.mark.parametrize("active_heads", [0, 3])
def test_fp8_scales_dequantize(active_heads):
    q8, k8, w, table, seq_lens, q_scale, k_scale = fp8_site(SEQ_LENS)
    scales = dict(q_scale=q_scale, k_scale=k_scale)
    values, indices = ops.paged_decode_topk(q8, k8, w, table, seq_lens, 10, active_heads, 32,
                                            0.7, **scales)
    # The same op on the fp32 real values gives the same bits.
    real = ops.paged_decode_topk(q8.float() * q_scale[..., None],
                                 k8.float() * k_scale[..., None], w, table, seq_lens, 10,
                                 active_heads, 32, 0.7)
    assert torch.equal(values.sort(-1).values, real[0].sort(-1).values)
    k = gathered(k8, table, seq_lens, k_scale)
    heads = (reference_heads(q8, k, w, seq_lens, active_heads, 32, q_scale) if active_heads
             else None)
    scores = reference_scores(q8, k, w, seq_lens, 0.7, heads, q_scale)
    assert_selects_reference(values, indices, scores, 10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    q, k_cache, w, table, seq_lens = paged_site(SEQ_LENS, seed=6, dtype=dtype)
    values, indices = ops.paged_decode_topk(q, k_cache, w, table, seq_lens, 10, 3, 32)
    k = gathered(k_cache, table, seq_lens)
    heads = reference_heads(q, k, w, seq_lens, 3, 32)
    assert_selects_reference(values, indices, reference_scores(q, k, w, seq_lens, 1.0, heads),
                             10, rel_tol=1e-4)


# --- validation ---------------------------------------------------------------------------------

def _bad_calls():
    q, k_cache, w, table, seq_lens = paged_site((40, 20))
    ok = dict(q=q, k_cache=k_cache, w=w, block_table=table, seq_lens=seq_lens, k_top=4,
              active_heads=2, block_size=32)
    bad_table = table.clone()
    bad_table[1, 1] = 99
    unused_ok = table.clone()
    unused_ok[1, 2] = 99  # sequence 1 (20 keys) uses pages 0 and 1 only
    return {
        "q rank": (dict(q=q[:, None]), ValueError, "q must have layout [B, H, D]"),
        "k_cache dim": (dict(k_cache=k_cache[..., :8]), ValueError,
                        "k_cache has shape (15, 16, 8)"),
        "w shape": (dict(w=w[:, :4]), ValueError, "w has shape (2, 4), expected [2, 8]"),
        "table batch": (dict(block_table=table[:1]), ValueError, "block_table has shape (1, 6)"),
        "seq_lens shape": (dict(seq_lens=seq_lens[:1]), ValueError, "seq_lens has shape (1,)"),
        "table dtype": (dict(block_table=table.float()), TypeError,
                        "block_table has dtype torch.float32"),
        "seq_lens dtype": (dict(seq_lens=seq_lens.float()), TypeError,
                           "seq_lens has dtype torch.float32"),
        "q dtype": (dict(q=q.double()), TypeError, "q has dtype torch.float64"),
        "empty page": (dict(k_cache=k_cache[:, :0]), ValueError, "empty input, page=0"),
        "seq_len too long": (dict(seq_lens=torch.tensor([40, 97])), ValueError,
                             "seq_lens[1] = 97; allowed range is [0, pages * page] = [0, 96]"),
        "negative seq_len": (dict(seq_lens=torch.tensor([-1, 20])), ValueError,
                             "seq_lens[0] = -1"),
        "page out of range": (dict(block_table=bad_table), ValueError,
                              "block_table[1, 1] = 99 but sequence 1 (seq_len 20) uses that page"),
        "unused -1 page": (dict(block_table=table.clone().fill_(-1)), ValueError,
                           "block_table[0, 0] = -1"),
        "block not a page multiple": (dict(block_size=24), ValueError,
                                      "block_size=24; must be a positive multiple of the page "
                                      "size 16"),
        "block zero": (dict(block_size=0), ValueError, "block_size=0"),
        "too many heads": (dict(active_heads=9), ValueError,
                           "active_heads=9; allowed range is [0, 8]"),
        "negative heads": (dict(active_heads=-1), ValueError, "active_heads=-1"),
        "k_top": (dict(k_top=0), ValueError, "k_top=0; allowed range is >= 1"),
        "scale": (dict(scale=0.0), ValueError, "scale=0.0"),
        "k_scale shape": (dict(k_scale=torch.ones(2, 96)), ValueError,
                          "k_scale has shape (2, 96), expected [P, page] = [15, 16]"),
        "q_scale zero": (dict(q_scale=torch.zeros(2, 8)), ValueError,
                         "every scale must be finite and > 0"),
        "device": (dict(seq_lens=seq_lens.to("meta")), ValueError, "seq_lens is on meta"),
    }, ok, unused_ok


BAD_CALLS, VALID_CALL, UNUSED_ENTRY_TABLE = _bad_calls()


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_inputs_are_refused_with_a_clear_error(case):
    overrides, error, message = BAD_CALLS[case]
    args = {**VALID_CALL, **overrides}
    with pytest.raises(error, match=re.escape("misa.paged_decode_topk: ") + ".*"
                       + re.escape(message)):
        ops.paged_decode_topk(**args)


def test_table_entries_past_a_sequence_are_not_checked():
    values, _ = ops.paged_decode_topk(**{**VALID_CALL, "block_table": UNUSED_ENTRY_TABLE})
    assert torch.isfinite(values).all()


# --- registration -------------------------------------------------------------------------------

@pytest.mark.parametrize("active_heads", [0, 2])
@pytest.mark.parametrize("scaled", [False, True])
def test_opcheck(active_heads, scaled):
    q, k_cache, w, table, seq_lens = paged_site((40, 0, 7), pages=3, heads=4, dim=8)
    kwargs = dict(active_heads=active_heads, block_size=16, scale=0.5)
    if scaled:
        kwargs.update(q_scale=torch.rand(3, 4) + 0.5, k_scale=torch.rand(k_cache.shape[:2]) + 0.5)
    results = torch.library.opcheck(ops.paged_decode_topk, (q, k_cache, w, table, seq_lens, 5),
                                    kwargs, test_utils=OPCHECK_UTILS)
    assert results == {name: "SUCCESS" for name in OPCHECK_UTILS}


def test_compile_dynamic_traces_once():
    """The fake impl builds its sizes from SymInts: a second (B, P, pages) reuses the graph."""
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    def decode(q, k_cache, w, table, seq_lens):
        return ops.paged_decode_topk(q, k_cache, w, table, seq_lens, 6, 2, 32)

    compiled = torch.compile(decode, backend=counter, dynamic=True, fullgraph=True)
    for number, (lengths, pages) in enumerate((((40, 9, 0), 3), ((70, 5, 33, 64, 1), 5))):
        args = paged_site(lengths, pages=pages, spare_pages=2 + number)
        with torch.compiler.set_stance("fail_on_recompile" if number else "default"):
            got = compiled(*args)
        want = decode(*args)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert counter.frame_count == 1


def pool_scales(k_cache, table, seq_lens, seed):
    """k_scale [P, page] as a serving pool holds it: in [0.5, 1.5) at every visible key, 0 (a
    zeroed pool) in free pages and in the unwritten slots of last pages, NaN in one free slot.
    Also the mask of the visible slots."""
    gen = torch.Generator().manual_seed(seed)
    num_pages, page = k_cache.shape[:2]
    visible = torch.zeros(num_pages, page, dtype=torch.bool)
    for b, length in enumerate(seq_lens.tolist()):
        for n in range(length):
            visible[table[b, n // page], n % page] = True
    k_scale = torch.where(visible, torch.rand(num_pages, page, generator=gen) + 0.5, 0.0)
    free = (~visible).nonzero()
    k_scale[tuple(free[len(free) // 2])] = float("nan")
    return k_scale, visible


@pytest.mark.parametrize("active_heads", [0, 2])
def test_only_the_scales_of_visible_keys_are_checked(active_heads):
    """Free pages and the unwritten slots of a last page may hold any scale (a zeroed pool: 0):
    the op neither raises (CPU, host checks) nor poisons (Triton under the interpreter), and
    selects as with valid scales there. A bad scale at a visible key raises naming it, or
    poisons exactly its sequence."""
    q, k_cache, w, table, seq_lens = paged_site(SEQ_LENS, seed=11)
    k_scale, visible = pool_scales(k_cache, table, seq_lens, seed=11)
    assert (k_scale[~visible] == 0).any() and k_scale[~visible].isnan().any()
    args = (q, k_cache, w, table, seq_lens, 10, active_heads, 32, 1.0, None)
    want = ops.paged_decode_topk(*args, torch.where(visible, k_scale, 1.0))
    implementations = [ops.paged_decode_topk]
    if INTERPRETER:
        implementations.append(cuda_ops.CUDA_IMPLEMENTATIONS["paged_decode_topk"])
    # Selections are unordered, and Triton's sums round apart from torch's: compared as sorted
    # values and as sets.
    for run in implementations:
        got = run(*args, k_scale)
        torch.testing.assert_close(got[0].sort(-1).values, want[0].sort(-1).values)
        assert finite_sets(*got) == finite_sets(*want)
    bad = k_scale.clone()
    page, slot = int(table[3, 50 // 16]), 50 % 16  # key 50 of sequence 3 (seq_len 53)
    bad[page, slot] = -1.0
    message = (f"k_scale[{page}, {slot}] = -1.0, the scale of key 50 of sequence 3 (seq_len 53); "
               "the scales of the keys a sequence sees must be finite and > 0")
    with pytest.raises(ValueError, match=re.escape(message)):
        ops.paged_decode_topk(*args, bad)
    if INTERPRETER:
        values, indices = cuda_ops.CUDA_IMPLEMENTATIONS["paged_decode_topk"](*args, bad)
        assert values[3].isnan().all() and (indices[3] == -1).all()
        assert not values[:3].isnan().any()
        assert finite_sets(values[:3], indices[:3]) == finite_sets(want[0][:3], want[1][:3])


# --- the Triton path under the interpreter ------------------------------------------------------

if INTERPRETER:
    from misa_compile.kernels import torch_impl
    from misa_compile.kernels.triton import register as cuda_ops
    from misa_compile.kernels.triton.scoring.router_scores import pooled_keys

triton_only = pytest.mark.skipif(not INTERPRETER,
                                 reason="CPU interpreter tests (the GPU has tests/gpu)")


@triton_only
@pytest.mark.parametrize("active_heads", [0, 2])
@pytest.mark.parametrize("k_top", [10, 100])
def test_triton_paged_matches_the_torch_implementation(active_heads, k_top):
    q, k_cache, w, table, seq_lens = paged_site(SEQ_LENS, seed=7)
    args = (q, k_cache, w, table, seq_lens, k_top, active_heads, 32, 0.5)
    values, indices = cuda_ops.CUDA_IMPLEMENTATIONS["paged_decode_topk"](*args)
    want_values, want_indices = torch_impl.paged_decode_topk(*args)
    k = gathered(k_cache, table, seq_lens)
    heads = reference_heads(q, k, w, seq_lens, active_heads, 32) if active_heads else None
    assert_selects_reference(values, indices, reference_scores(q, k, w, seq_lens, 0.5, heads),
                             k_top)
    torch.testing.assert_close(values.sort(-1).values, want_values.sort(-1).values)
    assert ((indices >= 0) & (indices < k.shape[1])).all()


@triton_only
@pytest.mark.parametrize("active_heads", [0, 3])
def test_triton_paged_with_fp8(active_heads):
    q8, k8, w, table, seq_lens, q_scale, k_scale = fp8_site(SEQ_LENS, seed=8)
    scales = (q_scale, k_scale)
    values, indices = cuda_ops.CUDA_IMPLEMENTATIONS["paged_decode_topk"](q8, k8, w, table, seq_lens, 10,
                                                       active_heads, 32, 1.0, *scales)
    k = gathered(k8, table, seq_lens, k_scale)
    heads = (reference_heads(q8, k, w, seq_lens, active_heads, 32, q_scale) if active_heads
             else None)
    scores = reference_scores(q8, k, w, seq_lens, 1.0, heads, q_scale)
    assert_selects_reference(values, indices, scores, 10, rel_tol=2e-6)


@triton_only
def test_triton_paged_pooled_keys_respect_each_length():
    """Per sequence: block means over its own keys; the partial last block averages its valid
    keys; blocks past seq_len are zero. With a k_scale, of the dequantized keys."""
    q8, k8, w, table, seq_lens, q_scale, k_scale = fp8_site(SEQ_LENS, seed=9)
    got = pooled_keys(k8, 32, k_scale, table, seq_lens.int())
    k = gathered(k8, table, seq_lens, k_scale)
    for b, length in enumerate(seq_lens.tolist()):
        for block in range(3):
            start, end = block * 32, min(block * 32 + 32, length)
            want = k[b, start:end].mean(0) if end > start else torch.zeros(k.shape[-1])
            torch.testing.assert_close(got[b, block], want.float(), rtol=1e-6, atol=1e-6)


# --- the router's pooled keys kept between steps (misa::paged_pooled_keys) -----------------------

def grown(k_cache, table, seq_lens, new_tokens, seed):
    """The cache after `new_tokens` more keys per sequence (as a serving step writes them into
    the slots after each sequence's end; every sequence owns pages enough): (k_cache, seq_lens)."""
    gen = torch.Generator().manual_seed(seed)
    k_cache = k_cache.clone()
    page = k_cache.shape[1]
    lengths = seq_lens + new_tokens
    for b, (old, new) in enumerate(zip(seq_lens.tolist(), lengths.tolist())):
        for n in range(old, new):
            k_cache[int(table[b, n // page]), n % page] = torch.randn(k_cache.shape[2],
                                                                      generator=gen)
    return k_cache, lengths


def owned_table(seq_lens, pages=6, page=16, spare=3, seed=0):
    """A table where every sequence owns all its `pages` (a step may grow into them)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(len(seq_lens) * pages + spare, generator=gen)[:len(seq_lens) * pages
                                                                       ].view(-1, pages).int()


def pooled_site(seed=0, lengths=(70, 0, 33, 17)):
    q, k_cache, w, _, _ = paged_site(lengths, seed=seed)
    seq_lens = torch.tensor(lengths)
    return q, k_cache, w, owned_table(seq_lens, seed=seed), seq_lens


@pytest.mark.parametrize("scaled", [False, True])
def test_pooled_keys_are_each_sequences_block_means(scaled):
    q, k_cache, w, table, seq_lens = pooled_site()
    k_scale = torch.rand(k_cache.shape[:2]) + 0.5 if scaled else None
    got = ops.paged_pooled_keys(k_cache, table, seq_lens, 32, k_scale)
    k = gathered(k_cache, table, seq_lens, k_scale)
    assert got.shape == (4, 3, 16) and got.dtype == torch.float32
    for b, length in enumerate(seq_lens.tolist()):
        for block in range(3):
            start, end = block * 32, min(block * 32 + 32, length)
            want = k[b, start:end].mean(0) if end > start else torch.zeros(k.shape[-1])
            torch.testing.assert_close(got[b, block], want.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("new_tokens", [(1, 1, 1, 1), (5, 40, 0, 31)])
def test_pooled_update_equals_a_full_recompute(new_tokens):
    """One decode step (1 token each) and a ragged prefill chunk (crossing blocks, a sequence
    starting from 0 keys, one unchanged)."""
    _, k_cache, _, table, seq_lens = pooled_site(seed=1)
    before = ops.paged_pooled_keys(k_cache, table, seq_lens, 32)
    k_cache, lengths = grown(k_cache, table, seq_lens, torch.tensor(new_tokens), seed=2)
    updated = ops.paged_pooled_keys(k_cache, table, lengths, 32, pooled=before,
                                    first_token=seq_lens)
    assert torch.equal(updated, ops.paged_pooled_keys(k_cache, table, lengths, 32))
    assert not torch.equal(updated, before), "the step must change some block"


def test_pooled_update_keeps_the_blocks_before_the_first_new_token():
    """The caller's promise is taken as given: a key changed before first_token // block_size
    does not reach the cached means (so the update reads only the new blocks' keys)."""
    _, k_cache, _, table, seq_lens = pooled_site(seed=3)
    before = ops.paged_pooled_keys(k_cache, table, seq_lens, 32)
    changed = k_cache.clone()
    changed[int(table[0, 0]), 0] += 10.0  # key 0 of sequence 0, block 0
    updated = ops.paged_pooled_keys(changed, table, seq_lens, 32, pooled=before,
                                    first_token=torch.tensor([32, 0, 0, 0]))
    assert torch.equal(updated[0, 0], before[0, 0])
    assert torch.equal(updated[0, 1:], before[0, 1:])


@pytest.mark.parametrize("active_heads", [2, 8])
def test_decode_with_cached_pooled_keys_equals_decode_without(active_heads):
    q, k_cache, w, table, seq_lens = pooled_site(seed=4)
    pooled = ops.paged_pooled_keys(k_cache, table, seq_lens, 32)
    args = (q, k_cache, w, table, seq_lens, 10, active_heads, 32, 0.5)
    values, indices = ops.paged_decode_topk(*args, pooled_keys=pooled)
    want_values, want_indices = ops.paged_decode_topk(*args)
    assert torch.equal(values, want_values)
    assert finite_sets(values, indices) == finite_sets(want_values, want_indices)


def _bad_pooled_calls():
    q, k_cache, w, table, seq_lens = pooled_site(seed=5)
    pooled = ops.paged_pooled_keys(k_cache, table, seq_lens, 32)
    ok = dict(k_cache=k_cache, block_table=table, seq_lens=seq_lens, block_size=32,
              pooled=pooled, first_token=seq_lens)
    return {
        "pooled alone": (dict(first_token=None), ValueError,
                         "pooled and first_token come together"),
        "pooled shape": (dict(pooled=pooled[:, :2]), ValueError,
                         "pooled has shape (4, 2, 16), expected [4, 3, 16]"),
        "pooled dtype": (dict(pooled=pooled.double()), TypeError,
                         "pooled has dtype torch.float64; allowed: torch.float32"),
        "first_token shape": (dict(first_token=seq_lens[:2]), ValueError,
                              "first_token has shape (2,), expected [4]"),
        "first_token dtype": (dict(first_token=seq_lens.float()), TypeError,
                              "first_token has dtype torch.float32"),
        "first_token range": (dict(first_token=torch.tensor([0, 0, 97, 0])), ValueError,
                              "first_token[2] = 97; allowed range is [0, pages * page] = [0, 96]"),
        "block size": (dict(block_size=24), ValueError, "block_size=24"),
        "seq_len too long": (dict(seq_lens=torch.tensor([97, 0, 0, 0])), ValueError,
                             "seq_lens[0] = 97"),
        "device": (dict(first_token=seq_lens.to("meta")), ValueError,
                   "first_token is on meta but k_cache is on cpu"),
    }, ok


BAD_POOLED_CALLS, VALID_POOLED_CALL = _bad_pooled_calls()


@pytest.mark.parametrize("case", sorted(BAD_POOLED_CALLS))
def test_bad_pooled_inputs_are_refused_with_a_clear_error(case):
    overrides, error, message = BAD_POOLED_CALLS[case]
    with pytest.raises(error, match=re.escape("misa.paged_pooled_keys: ") + ".*"
                       + re.escape(message)):
        ops.paged_pooled_keys(**{**VALID_POOLED_CALL, **overrides})


@pytest.mark.parametrize("overrides,message", [
    (dict(active_heads=0), "pooled_keys is given but active_heads=0"),
    (dict(block_size=16), "pooled_keys has shape (4, 3, 16), expected [4, 6, 16]"),
])
def test_decode_refuses_pooled_keys_that_cannot_serve_it(overrides, message):
    q, k_cache, w, table, seq_lens = pooled_site(seed=6)
    pooled = ops.paged_pooled_keys(k_cache, table, seq_lens, 32)
    call = dict(q=q, k_cache=k_cache, w=w, block_table=table, seq_lens=seq_lens, k_top=4,
                active_heads=2, block_size=32, pooled_keys=pooled)
    with pytest.raises(ValueError, match=re.escape(message)):
        ops.paged_decode_topk(**{**call, **overrides})


@pytest.mark.parametrize("update", [False, True])
def test_pooled_keys_opcheck(update):
    _, k_cache, _, table, seq_lens = pooled_site(seed=7)
    kwargs = dict(block_size=32, k_scale=torch.rand(k_cache.shape[:2]) + 0.5)
    if update:
        kwargs.update(pooled=ops.paged_pooled_keys(k_cache, table, seq_lens, 32),
                      first_token=seq_lens // 2)
    results = torch.library.opcheck(ops.paged_pooled_keys, (k_cache, table, seq_lens), kwargs,
                                    test_utils=OPCHECK_UTILS)
    assert results == {name: "SUCCESS" for name in OPCHECK_UTILS}


@triton_only
@pytest.mark.parametrize("new_tokens", [(1, 1, 1, 1), (5, 40, 0, 31)])
def test_triton_pooled_update_is_a_full_recompute_bit_for_bit(new_tokens):
    _, k_cache, _, table, seq_lens = pooled_site(seed=8)
    run = cuda_ops.CUDA_IMPLEMENTATIONS["paged_pooled_keys"]
    before = run(k_cache, table, seq_lens, 32, None, None, None)
    torch.testing.assert_close(before, torch_impl.paged_pooled_keys(k_cache, table, seq_lens, 32),
                               rtol=1e-6, atol=1e-6)
    k_cache, lengths = grown(k_cache, table, seq_lens, torch.tensor(new_tokens), seed=9)
    updated = run(k_cache, table, lengths, 32, None, before, seq_lens)
    assert torch.equal(updated, run(k_cache, table, lengths, 32, None, None, None))


@triton_only
def test_triton_decode_with_cached_pooled_keys_equals_decode_without():
    q, k_cache, w, table, seq_lens = pooled_site(seed=10)
    pooled = cuda_ops.CUDA_IMPLEMENTATIONS["paged_pooled_keys"](k_cache, table, seq_lens, 32,
                                                                None, None, None)
    decode = cuda_ops.CUDA_IMPLEMENTATIONS["paged_decode_topk"]
    args = (q, k_cache, w, table, seq_lens, 10, 3, 32, 0.5, None, None)
    values, indices = decode(*args, pooled)
    want_values, want_indices = decode(*args, None)
    assert torch.equal(values, want_values)
    assert finite_sets(values, indices) == finite_sets(want_values, want_indices)


@triton_only
def test_triton_pooled_keys_poison_a_sequence_with_a_bad_length_or_page():
    """No host check on CUDA outside debug mode: the launcher clamps on the device and the
    faulty sequences' blocks are NaN, the others those of the torch implementation."""
    from misa_compile.kernels.triton.launch.paged_pooled_keys import paged_pooled_keys_op

    _, k_cache, _, table, seq_lens = pooled_site(seed=11)
    bad_lens, bad_table = seq_lens.clone(), table.clone()
    bad_lens[1] = 200          # past pages * page = 96
    bad_table[2, 0] = 10 ** 6  # a used page of sequence 2 outside the cache
    got = paged_pooled_keys_op(k_cache, bad_table, bad_lens, 32)
    assert got[1].isnan().all() and got[2].isnan().all()
    want = torch_impl.paged_pooled_keys(k_cache, table, seq_lens, 32)
    torch.testing.assert_close(got[[0, 3]], want[[0, 3]], rtol=1e-6, atol=1e-6)


@triton_only
@pytest.mark.parametrize("scaled", [False, True], ids=["no k_scale", "k_scale"])
@pytest.mark.parametrize("page", [16, 5])
@pytest.mark.parametrize("pages,dtype", [(1, torch.int32), (6, torch.int64), (13, torch.int32)])
def test_triton_checked_paging_matches_its_definition(pages, dtype, page, scaled):
    """One launch: lengths clamped into [0, pages * page], every page id into [0, P), and the
    fault of each sequence whose length or used pages were out of range (unused entries may hold
    anything) or, with a k_scale, one of whose keys [0, seq_len) (through the clamped page ids)
    has a scale that is not finite and > 0; other slots may hold anything."""
    from misa_compile.kernels.triton.launch.paged_decode_topk import checked_paging

    gen = torch.Generator().manual_seed(pages * page)
    batch, num_pages = 9, 20
    k_cache = torch.zeros(num_pages, page, 4)
    table = torch.randint(-3, num_pages + 3, (batch, pages), generator=gen).to(dtype)
    seq_lens = torch.randint(-2, pages * page + 3, (batch,), generator=gen).to(dtype)
    k_scale = None
    if scaled:
        k_scale = torch.rand(num_pages, page, generator=gen) + 0.5
        for bad in BAD_SCALES:  # each in a random slot of a random page
            where = torch.randint(0, num_pages * page, (1,), generator=gen).item()
            k_scale.view(-1)[where] = bad
    got_table, got_lens, got_faults = checked_paging(k_cache, table, seq_lens, k_scale)
    lengths = seq_lens.clamp(0, pages * page)
    used = torch.arange(pages) * page < lengths[:, None]
    bad_page = (used & ((table < 0) | (table >= num_pages))).any(-1)
    bad_len = (seq_lens < 0) | (seq_lens > pages * page)
    want = bad_page | bad_len
    if scaled:
        visible = torch.arange(pages * page) < lengths[:, None]
        scales = k_scale[table.clamp(0, num_pages - 1).long()].view(batch, pages * page)
        want = want | (visible & ~((scales > 0) & (scales < float("inf")))).any(-1)
    assert torch.equal(got_faults, want)
    assert got_faults.any() and not got_faults.all(), "the case must have both kinds of rows"
    assert torch.equal(got_table, table.clamp(0, num_pages - 1))
    assert torch.equal(got_lens, lengths)
    assert got_table.dtype == dtype and got_lens.dtype == dtype
