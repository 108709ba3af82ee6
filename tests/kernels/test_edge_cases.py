"""Arguments at the edge of their range: a HISA block far longer than the context, a k_top beyond
int64, a missing config; each gives a sized result or a readable error."""
from __future__ import annotations

import pytest
import torch

import misa_compile
from misa_compile import MisaConfig
from misa_compile.kernels import torch_impl

ops = torch.ops.misa


def inputs(queries=4, keys=10, heads=2, dim=8):
    torch.manual_seed(0)
    return (torch.randn(1, queries, heads, dim), torch.randn(1, keys, dim),
            torch.randn(1, queries, heads))


def test_hisa_candidates_with_a_block_longer_than_the_context_lists_the_keys_once():
    q, k, w = inputs()
    candidates = ops.hisa_candidates(q, k, w, block_size=10 ** 9, num_blocks=2)
    assert torch.equal(candidates, torch.arange(10).expand(1, 4, 10))


@pytest.mark.parametrize("block_size, num_blocks, width", [
    (4, 3, 10),   # all three blocks kept: every key once, not 12 ids
    (4, 2, 8),    # two of three blocks: two whole blocks
    (5, 2, 10),   # exactly the context
    (10 ** 9, 1, 10),
])
def test_fake_and_cpu_widths_agree(block_size, num_blocks, width):
    q, k, w = inputs()
    real = ops.hisa_candidates(q, k, w, block_size, num_blocks)
    with torch._subclasses.FakeTensorMode() as mode:
        fake = ops.hisa_candidates(mode.from_tensor(q), mode.from_tensor(k), mode.from_tensor(w),
                                   block_size, num_blocks)
    assert real.shape[-1] == fake.shape[-1] == width


def test_triton_hisa_agrees_on_a_huge_block(monkeypatch):
    from misa_compile.kernels.triton.launch.hisa_candidates import hisa_candidates

    q, k, w = inputs()
    ours = hisa_candidates(q, k, w, 10 ** 9, 2, True, None, None)
    ref = torch_impl.hisa_candidates(q, k, w, 10 ** 9, 2, True, None, None, None, 0)
    assert torch.equal(ours, ref)


def test_hisa_variant_with_a_huge_block_selects_what_dense_selects():
    q, k, w = inputs()
    dense = misa_compile.indexer_topk(q, k, w, 3, MisaConfig("dense"))
    hisa = misa_compile.indexer_topk(q, k, w, 3, MisaConfig("hisa", hisa_block=10 ** 9,
                                                            hisa_blocks=2))
    assert torch.equal(dense[1].sort(-1).values, hisa[1].sort(-1).values)


def test_k_top_beyond_int64_is_a_readable_error():
    q, k, w = inputs()
    with pytest.raises(ValueError, match=r"k_top=9223372036854775808; allowed range is "
                                         r"\[1, 2\*\*63 - 1\]"):
        misa_compile.indexer_topk(q, k, w, 2 ** 63, MisaConfig("dense"))
    values, _ = misa_compile.indexer_topk(q, k, w, 2 ** 63 - 1, MisaConfig("dense"))
    assert values.shape == (1, 4, 10)


def test_indexer_topk_without_a_config_is_a_type_error():
    q, k, w = inputs()
    with pytest.raises(TypeError, match="config must be a MisaConfig .* got NoneType"):
        misa_compile.indexer_topk(q, k, w, 8, None)


def test_causal_with_fewer_keys_than_queries_is_refused_as_documented():
    q, k, w = inputs(queries=8, keys=4)
    with pytest.raises(ValueError, match="causal=True needs T >= S"):
        ops.dense_topk(q, k, w, 2, causal=True)
    values, _ = ops.dense_topk(q, k, w, 2, causal=False)  # the other layouts' way
    assert values.shape == (1, 8, 2)
