"""torch.compile(backend="misa", options={"context_parallel": True}) on a gloo group of 2 CPU
processes: each rank compiles a plain indexer module on its own contiguous key shard, and the
rewritten site (one misa::sharded_topk op) returns the global top-k with global key indices,
equal to the single-device indexer over all keys. Masked sites are refused, and compiling without
a process group is a clear error."""
from __future__ import annotations

import re

import pytest
import torch

import misa_compile.backend
from misa_compile import MisaConfig
from misa_compile.distributed import count_collective_bytes, sharded_indexer_topk

from .cases import ShardedCase, assert_matches_single_device, integer_tensor

WORLD = 2
SCALE = 0.5  # a power of two: scores of the small integer inputs stay exact in float32


class PlainIndexer(torch.nn.Module):
    """A DSA lightning indexer as a model spells it: einsum, ReLU, per-head weights, sum over
    heads, top-k over the keys; optionally a boolean visibility mask (hidden keys get -inf)."""

    def __init__(self, k_top: int):
        super().__init__()
        self.k_top = k_top

    def forward(self, q, k, w, visible=None):
        scores = torch.relu(torch.einsum("bshd,btd->bsht", q, k) * SCALE)
        scores = (scores * w.unsqueeze(-1)).sum(dim=2)
        if visible is not None:
            scores = scores.masked_fill(~visible, float("-inf"))
        return scores.topk(self.k_top, dim=-1)


def compile_on_shard(q, k_local, w, k_top, options, visible=None, direct=None):
    """Rank task: compiles PlainIndexer with context parallelism (target aot_eager unless
    options name one) on this rank's key shard and runs it. direct=(config, key_offset, total_keys) also runs sharded_indexer_topk on
    the same shard for comparison."""
    torch._dynamo.reset()
    misa_compile.backend.clear_reports()
    compiled = torch.compile(PlainIndexer(k_top), backend="misa", options=dict(
        dict(target="aot_eager"), **options, context_parallel=True))
    args = (q, k_local, w) if visible is None else (q, k_local, w, visible)
    values, indices = compiled(*args)
    sites = [(s.status, s.reason, s.detail, s.variant)
             for s in misa_compile.backend.last_report().sites]
    answer = dict(values=values, indices=indices, sites=sites)
    if direct is not None:
        config, key_offset, total_keys = direct
        answer["direct"] = sharded_indexer_topk(q, k_local, w, k_top, config,
                                                key_offset=key_offset, total_keys=total_keys,
                                                scale=SCALE, causal=False)
    return answer


def call_sharded_op(q, k_local, w, k_top):
    return torch.ops.misa.sharded_topk(q, k_local, w, k_top, "dense", 1, 1, 1, "score", 1.0,
                                       False)


def call_sharded_op_counting_bytes(q, k_local, w, k_top):
    with count_collective_bytes() as traffic:
        values, indices = call_sharded_op(q, k_local, w, k_top)
    return dict(values=values, indices=indices, steps=dict(traffic.bytes_by_step))


def _inputs(seed: int, batch=2, queries=3, heads=4, dim=5, keys=14):
    gen = torch.Generator().manual_seed(seed)
    q = integer_tensor(gen, (batch, queries, heads, dim), -2, 4)
    k = integer_tensor(gen, (batch, keys, dim), -2, 4)
    w = integer_tensor(gen, (batch, queries, heads), 1, 20) * (
        integer_tensor(gen, (batch, queries, heads), 0, 1) * 2 - 1)
    return q, k, w


def _run(pool, fn, per_rank):
    answers = pool.run(fn, per_rank)
    for answer in answers:
        assert answer.error is None, f"rank {answer.rank}: {answer.error}\n{answer.value}"
    return [a.value for a in answers]


def _assert_same_selection(values, indices, ref_values, ref_indices):
    """Same values; the same keys strictly above each query's k-th value (ties may differ)."""
    assert torch.equal(values.sort(-1).values, ref_values.sort(-1).values)
    for row in range(values.shape[0] * values.shape[1]):
        v, i = values.flatten(0, 1)[row], indices.flatten(0, 1)[row]
        rv, ri = ref_values.flatten(0, 1)[row], ref_indices.flatten(0, 1)[row]
        kth = v[torch.isfinite(v)].min()
        assert set(i[v > kth].tolist()) == set(ri[rv > kth].tolist())


# (options, shard sizes in rank order, k_top): uneven shards; k_top fits the smaller shard
# because Dynamo traces the original top-k on the local keys.
CASES = {
    "dense": (dict(variant="dense"), [6, 8], 5),
    "misa_all_heads": (dict(variant="misa", active_heads=4, block_size=3), [8, 6], 5),
    "dense_inductor": (dict(variant="dense", target="inductor"), [6, 8], 5),
}


@pytest.mark.parametrize("name", CASES)
def test_compiled_site_equals_single_device_over_all_keys(rank_pools, name):
    options, sizes, k_top = CASES[name]
    q, k, w = _inputs(seed=len(name))
    offsets = [0, sizes[0]]
    per_rank = [dict(q=q, k_local=k[:, o:o + n], w=w, k_top=k_top, options=options)
                for o, n in zip(offsets, sizes)]
    answers = _run(rank_pools(WORLD), compile_on_shard, per_rank)
    for answer in answers:
        [(status, reason, detail, variant)] = answer["sites"]
        assert (status, reason, variant) == ("rewritten", "", options["variant"])
        assert "context parallel" in detail
    config, _ = MisaConfig.from_options(options)
    case = ShardedCase(q, k, w, k_top, config, offsets, sizes, causal=False, scale=SCALE)
    rows, total = assert_matches_single_device(
        case, [(a["values"], a["indices"]) for a in answers])
    assert rows == total
    # Every selected key is a global index, and rank 1's shard supplies some of them.
    assert (answers[0]["indices"] >= sizes[0]).any()


@pytest.mark.parametrize("variant", ["misa", "misa_hier"])
def test_compiled_routed_site_equals_the_sharded_indexer(rank_pools, variant):
    # h < H: the compiled site must make the same head choices as sharded_indexer_topk.
    q, k, w = _inputs(seed=11, heads=5, keys=16)
    config = MisaConfig(variant=variant, active_heads=2, block_size=4, candidates=7)
    options = dict(variant=variant, active_heads=2, block_size=4, candidates=7)
    sizes, k_top = [9, 7], 4
    offsets = [0, sizes[0]]
    per_rank = [dict(q=q, k_local=k[:, o:o + n], w=w, k_top=k_top, options=options,
                     direct=(config, o, sum(sizes))) for o, n in zip(offsets, sizes)]
    answers = _run(rank_pools(WORLD), compile_on_shard, per_rank)
    for answer in answers:
        assert [s[:2] for s in answer["sites"]] == [("rewritten", "")]
        _assert_same_selection(answer["values"], answer["indices"], *answer["direct"])
        assert torch.equal(answer["values"], answers[0]["values"])
        assert torch.equal(answer["indices"], answers[0]["indices"])


def test_masked_site_is_refused_with_config_mismatch(rank_pools):
    q, k, w = _inputs(seed=3)
    visible = torch.ones(2, 3, 7, dtype=torch.bool)
    visible[..., 0] = False
    per_rank = [dict(q=q, k_local=k[:, 7 * r:7 * (r + 1)], w=w, k_top=3,
                     options=dict(variant="misa", active_heads=2, block_size=4),
                     visible=visible)
                for r in range(WORLD)]
    answers = _run(rank_pools(WORLD), compile_on_shard, per_rank)
    for rank, answer in enumerate(answers):
        [(status, reason, detail, _)] = answer["sites"]
        assert (status, reason) == ("refused", "config_mismatch")
        assert "causal/ragged visibility only, no mask and no HISA" in detail
        # Left untouched: the local top-k of the masked local scores, local indices.
        k_local = k[:, 7 * rank:7 * (rank + 1)]
        expected = PlainIndexer(3)(q, k_local, w, visible)
        assert torch.equal(answer["values"], expected.values)


def test_k_top_above_the_global_key_count_is_refused_on_every_rank(rank_pools):
    q, k, w = _inputs(seed=5, keys=6)
    per_rank = [dict(q=q, k_local=k[:, 3 * r:3 * (r + 1)], w=w, k_top=7) for r in range(WORLD)]
    answers = rank_pools(WORLD).run(call_sharded_op, per_rank)
    for answer in answers:
        assert answer.error is not None
        assert re.search(r"ValueError: misa.sharded_topk: k_top=7 exceeds the total key count 6",
                         answer.error), answer.error


def test_the_op_learns_offsets_from_the_agreement_exchange_alone(rank_pools):
    # Rank 0 holds no key: the offsets and the total come from the shard sizes gathered by the
    # agreement step; no other metadata exchange runs (one host read per call).
    q, k, w = _inputs(seed=9, keys=10)
    sizes = [0, 10]
    per_rank = [dict(q=q, k_local=k[:, sum(sizes[:r]):sum(sizes[:r + 1])], w=w, k_top=4)
                for r in range(WORLD)]
    answers = _run(rank_pools(WORLD), call_sharded_op_counting_bytes, per_rank)
    case = ShardedCase(q, k, w, 4, MisaConfig(variant="dense"), [0, 0], sizes, causal=False)
    assert_matches_single_device(case, [(a["values"], a["indices"]) for a in answers])
    for answer in answers:
        assert set(answer["steps"]) == {"shard agreement", "selection merge"}


def test_context_parallel_without_a_process_group_is_a_clear_error():
    assert not torch.distributed.is_initialized()
    q, k, w = _inputs(seed=1)
    compiled = torch.compile(PlainIndexer(4), backend="misa", options=dict(
        variant="dense", context_parallel=True, target="aot_eager"))
    with pytest.raises(Exception, match="context_parallel=True: torch.distributed has no "
                                        "initialised process group"):
        compiled(q, k, w)
    with pytest.raises(RuntimeError, match="misa.sharded_topk: torch.distributed has no "
                                           "initialised process group"):
        call_sharded_op(q, k, w, 4)
