"""Value checks without host synchronisation (kernels/triton/launch/device_checks.py): the CUDA
launchers, run by Triton's CPU interpreter on CPU tensors, clamp out-of-range values before
any kernel reads them and poison the affected rows (values NaN, indices -1; ids -1), leaving
every other row equal to the torch implementation. The debug mode that makes CUDA calls check on
the host instead (validation.debug_checks, MISA_DEBUG_CHECKS=1) is tested here for its switch;
the CPU ops always check on the host (tests/kernels/test_validation.py)."""
import os

import pytest
import torch

from misa_compile.kernels import torch_impl
from misa_compile.kernels.validation import debug_checks, debug_checks_enabled, host_value_checks

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="CPU interpreter tests")

if INTERPRET:
    from misa_compile.kernels.triton.launch.dense_topk import dense_topk_op
    from misa_compile.kernels.triton.launch.hisa_candidates import hisa_candidates_op
    from misa_compile.kernels.triton.launch.paged_decode_topk import paged_decode_topk_op
    from misa_compile.kernels.triton.launch.route_heads import route_heads_op
    from misa_compile.kernels.triton.launch.routed_topk import routed_topk_op

B, S, T, H, D = 1, 8, 64, 4, 16


def make(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, S, H, D, generator=gen), torch.randn(B, T, D, generator=gen),
            torch.randn(B, S, H, generator=gen))


def same_rows(got, want):
    # ReLU scores tie at 0 often at these sizes: compare the selected values, not the ids.
    (gv, gi), (wv, _) = got, want
    torch.testing.assert_close(gv.sort(-1).values, wv.sort(-1).values)
    assert (gi >= 0).all()


def test_debug_switch(monkeypatch):
    monkeypatch.delenv("MISA_DEBUG_CHECKS", raising=False)
    assert not debug_checks_enabled()
    with debug_checks():
        assert debug_checks_enabled()
        with debug_checks(False):
            assert not debug_checks_enabled()
        assert debug_checks_enabled()
    assert not debug_checks_enabled()
    monkeypatch.setenv("MISA_DEBUG_CHECKS", "1")
    assert debug_checks_enabled()
    with debug_checks(False):
        assert not debug_checks_enabled()
    # Off CUDA the value checks always run on the host: they cost nothing there.
    monkeypatch.delenv("MISA_DEBUG_CHECKS")
    assert host_value_checks(torch.zeros(1)) and host_value_checks(torch.zeros(1, device="meta"))


@needs_interpreter
def test_routed_topk_poisons_rows_with_a_head_out_of_range():
    q, k, w = make()
    heads = torch.tensor([[0, 1]] * S).view(B, S, 2)
    bad = heads.clone()
    bad[0, 2, 1] = H
    bad[0, 5, 0] = -3
    values, indices = routed_topk_op(q, k, w, bad, 6, 1.0, True, None, None, None)
    poisoned = torch.zeros(S, dtype=torch.bool)
    poisoned[[2, 5]] = True
    assert values[0, poisoned].isnan().all() and (indices[0, poisoned] == -1).all()
    want = torch_impl.routed_topk(q, k, w, heads, 6, 1.0, True, None, None, None, 0)
    same_rows((values[:, ~poisoned], indices[:, ~poisoned]),
              (want[0][:, ~poisoned], want[1][:, ~poisoned]))


@needs_interpreter
def test_bad_scales_poison_rows_and_ids():
    q, k, w = make(1)
    q_scale = torch.rand(B, S, H) + 0.5
    k_scale = torch.rand(B, T) + 0.5
    q_scale[0, 3, 2] = float("nan")
    values, indices = dense_topk_op(q, k, w, 6, 1.0, True, None, None, None, 0, q_scale, k_scale)
    assert values[0, 3].isnan().all() and (indices[0, 3] == -1).all()
    assert not values[0, [0, 1, 2, 4, 5, 6, 7]].isnan().any()
    heads = route_heads_op(q, k, w, 2, 16, True, None, None, None, q_scale, k_scale)
    assert (heads[0, 3] == -1).all() and (heads[0, :3] >= 0).all()
    # A bad key scale poisons the whole sequence.
    k_scale[0, 40] = -1.0
    ids = hisa_candidates_op(q, k, w, 16, 2, True, None, None, None, 0, None, k_scale)
    assert (ids == -1).all()


@needs_interpreter
def test_paged_decode_clamps_and_poisons_bad_lengths_and_pages():
    gen = torch.Generator().manual_seed(2)
    batch, page, pages, num_pages = 4, 8, 4, 16
    q = torch.randn(batch, H, D, generator=gen)
    k_cache = torch.randn(num_pages, page, D, generator=gen)
    w = torch.randn(batch, H, generator=gen)
    table = torch.randperm(num_pages, generator=gen)[:batch * pages].view(batch, pages)
    seq_lens = torch.tensor([32, 20, 9, 5])
    bad_table, bad_lens = table.clone(), seq_lens.clone()
    bad_table[1, 2] = num_pages + 5  # a used page (seq_len 20 uses pages 0-2)
    bad_table[3, 3] = -1  # unused: sequence 3 has 5 keys, one page
    bad_lens[2] = pages * page + 1
    values, indices = paged_decode_topk_op(q, k_cache, w, bad_table, bad_lens, 6, 0, 8, 1.0)
    assert values[1:3].isnan().all() and (indices[1:3] == -1).all()
    want = torch_impl.paged_decode_topk(q, k_cache, w, table, seq_lens, 6, 0, 8, 1.0)
    for b in (0, 3):
        same_rows((values[b], indices[b]), (want[0][b], want[1][b]))


@needs_interpreter
@pytest.mark.parametrize("lead,faults_shape", [((3, 5), (3, 5)), ((3, 5), (3, 1)), ((4,), (4,))],
                         ids=["per-row", "per-sequence", "one-leading-dim"])
@pytest.mark.parametrize("with_values", [True, False], ids=["selection", "ids"])
def test_poison_rows_writes_the_faulted_rows_only(lead, faults_shape, with_values):
    from misa_compile.kernels.triton.poison_rows import poison_rows
    gen = torch.Generator().manual_seed(4)
    # Rows that are slices of wider buffers (row stride 1030, not the width) and a width past
    # one program step (1024 columns).
    values = torch.randn(*lead, 1030, generator=gen)[..., :1029]
    ids = torch.randint(0, 99, (*lead, 1030), generator=gen)[..., :1029]
    faults = torch.rand(faults_shape, generator=gen) < 0.5
    faults.view(-1)[0] = True
    want_values = values.masked_fill(faults[..., None], float("nan"))
    want_ids = ids.masked_fill(faults[..., None], -1)
    untouched = values.clone()
    poison_rows(values if with_values else None, ids, faults)
    assert torch.equal(ids, want_ids)
    if with_values:
        torch.testing.assert_close(values, want_values, equal_nan=True)
    else:
        assert torch.equal(values, untouched)


@needs_interpreter
def test_poison_rows_refuses_three_leading_dims():
    from misa_compile.kernels.triton.poison_rows import poison_rows
    with pytest.raises(ValueError, match="one or two leading dims"):
        poison_rows(None, torch.zeros(2, 2, 2, 4, dtype=torch.int64), torch.ones(2, 2, 2,
                                                                                 dtype=torch.bool))


BAD_SCALES = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, -1.0]


@pytest.mark.parametrize("bad", BAD_SCALES, ids=str)
def test_every_bad_scale_value_is_a_fault_of_its_row_only(bad):
    # Pure torch, so it runs with or without the interpreter. Edge values that are fine: the
    # smallest subnormal and the largest finite fp32.
    from misa_compile.kernels.triton.launch.device_checks import scale_faults
    q_scale = torch.rand(2, 5, 3) + 0.5
    q_scale[0, 1, 0] = torch.finfo(torch.float32).tiny / 2 ** 23
    q_scale[1, 2, 1] = torch.finfo(torch.float32).max
    k_scale = torch.rand(2, 7) + 0.5
    assert not scale_faults(q_scale, k_scale).any()
    q_scale[1, 3, 2] = bad
    faults = scale_faults(q_scale, None)
    assert faults.shape == (2, 5) and faults.nonzero().tolist() == [[1, 3]]
    k_scale[0, 6] = bad
    per_sequence = scale_faults(None, k_scale)
    assert per_sequence.tolist() == [[True], [False]]
    assert scale_faults(q_scale, k_scale).tolist() == [[True] * 5, [False] * 3 + [True, False]]
