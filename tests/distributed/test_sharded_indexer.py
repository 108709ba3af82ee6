"""The sharded indexer on gloo process groups of 2 and 4 CPU processes equals the single-device
op: same selected keys (up to ties) and values, for random shapes, uneven and empty shards, shards
held out of key order, ranks without a visible key, and every sharded variant."""
import pytest
import torch
from hypothesis import given, settings

from misa_compile import MisaConfig
from misa_compile.kernels import reference

from . import rank_tasks
from .cases import (ShardedCase, assert_matches_single_device, integer_tensor, sharded_cases,
                    shards_from_cuts, with_config)


def run_case(pool, case: ShardedCase):
    answers = pool.run(rank_tasks.run_sharded, case.rank_kwargs())
    errors = [a.error for a in answers if a.error]
    assert not errors, f"{errors[0]}\n{answers[[a.error for a in answers].index(errors[0])].value}"
    return assert_matches_single_device(case, [a.value for a in answers])


@pytest.mark.parametrize("world", [2, 4])
def test_random_cases_match_single_device(rank_pools, world):
    pool = rank_pools(world)
    compared = {"rows": 0, "total": 0}

    @settings(max_examples=60, deadline=None, derandomize=True, database=None)
    @given(case=sharded_cases(world))
    def check(case):
        rows, total = run_case(pool, case)
        compared["rows"] += rows
        compared["total"] += total

    check()
    # The margin rules must leave most queries compared, or the test proves little.
    assert compared["rows"] >= 0.8 * compared["total"], compared


def _fixed_case(variant: str, offsets, sizes, total=30, **changes) -> ShardedCase:
    gen = torch.Generator().manual_seed(7)
    q = integer_tensor(gen, (2, 4, 4, 5), -2, 4)
    k = integer_tensor(gen, (2, total, 5), -2, 4)
    w = integer_tensor(gen, (2, 4, 4), 1, 20) * (integer_tensor(gen, (2, 4, 4), 0, 1) * 2 - 1)
    config = MisaConfig(variant=variant, active_heads=2, block_size=8, candidates=12)
    case = ShardedCase(q, k, w, 6, config, list(offsets), list(sizes))
    for name, value in changes.items():
        setattr(case, name, value)
    return case


@pytest.mark.parametrize("variant", ["dense", "misa", "misa_hier"])
def test_empty_shard_and_rank_without_visible_keys(rank_pools, variant):
    # Rank 1 holds no key; every query's range ends at key 20, so rank 3 ([25, 30)) sees nothing
    # and rank 2 only part of its keys.
    offsets, sizes = [0, 10, 10, 25], [10, 0, 15, 5]
    key_start = torch.tensor([[0, 3, 9, 12]] * 2)
    key_end = torch.tensor([[20, 14, 20, 18]] * 2)
    case = _fixed_case(variant, offsets, sizes, causal=False, key_start=key_start,
                       key_end=key_end)
    rows, total = run_case(rank_pools(4), case)
    assert rows == total
    values, indices = case.single_device()
    assert (indices[torch.isfinite(values)] < 20).all()


@pytest.mark.parametrize("variant", ["dense", "misa", "misa_hier"])
def test_shards_smaller_than_a_router_block(rank_pools, variant):
    # Block 0 = keys [0, 8) spans ranks 0, 2 and 3 (rank 2 lies wholly inside it); the last,
    # partial block [24, 30) spans ranks 1 and 3's neighbour. Causal end-aligned visibility.
    offsets, sizes = shards_from_cuts(30, [3, 5, 26], [0, 2, 3, 1])
    case = _fixed_case(variant, offsets, sizes)
    rows, total = run_case(rank_pools(4), case)
    assert rows == total


@pytest.mark.parametrize("world", [2, 4])
def test_router_scores_equal_single_device(rank_pools, world):
    """Block sums straddling shards are combined exactly: the sharded router scores equal the
    float64 reference router scores, including blocks larger than a shard and partial last
    blocks (float inputs here, not integers)."""
    gen = torch.Generator().manual_seed(3)
    total, block = 37, 6
    q, k, w = (torch.randn(2, 5, 3, 4, generator=gen), torch.randn(2, total, 4, generator=gen),
               torch.randn(2, 5, 3, generator=gen))
    cuts = [4, 5, 20] if world == 4 else [11]
    offsets, sizes = shards_from_cuts(total, cuts, list(range(world)))
    key_start, key_end = torch.randint(0, 10, (2, 5), generator=gen), torch.full((2, 5), 35)
    kwargs = [dict(q=q, k_local=k[:, off:off + size], w=w, block=block, key_offset=off,
                   total_keys=total, causal=True, key_start=key_start, key_end=key_end)
              for off, size in zip(offsets, sizes)]
    answers = rank_pools(world).run(rank_tasks.run_router_scores, kwargs)
    assert not any(a.error for a in answers), [a.error for a in answers]
    expected = reference.router_scores(q, k, w, block, causal=True, key_start=key_start,
                                       key_end=key_end)
    for answer in answers:
        torch.testing.assert_close(answer.value.double(), expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(answer.value, answers[0].value)


def test_bfloat16_inputs_match_single_device(rank_pools):
    """Real-valued bf16 inputs: selections agree up to float rounding of the scores."""
    gen = torch.Generator().manual_seed(11)
    total = 64
    q = torch.randn(1, 6, 4, 8, generator=gen).bfloat16()
    k = torch.randn(1, total, 8, generator=gen).bfloat16()
    w = torch.randn(1, 6, 4, generator=gen).bfloat16()
    offsets, sizes = shards_from_cuts(total, [29], [0, 1])
    for variant in ("dense", "misa", "misa_hier"):
        config = MisaConfig(variant=variant, active_heads=4, block_size=16, candidates=20)
        case = ShardedCase(q, k, w, 10, config, offsets, sizes)
        answers = rank_pools(2).run(rank_tasks.run_sharded, case.rank_kwargs())
        values, indices = answers[0].value
        ref_values, ref_indices = case.single_device()
        torch.testing.assert_close(values.sort(-1).values, ref_values.sort(-1).values,
                                   rtol=1e-5, atol=1e-5)
        recall = reference.selection_recall(indices, values, ref_indices, ref_values)
        assert recall.min() == 1.0, variant


def test_communication_volume_follows_the_formula(rank_pools):
    """Bytes counted per step: agreement 8*17*W, block partials 4*W*B*D, router all-reduce
    4*B*S*H, candidate values 4*W*B*S*n_cand, selection merge 8*W*B*S*k_top."""
    world = 2
    case = with_config(_fixed_case("misa_hier", [0, 17], [17, 23], total=40), candidates=12)
    batch, queries, heads, dim = case.q.shape
    answers = rank_pools(world).run(rank_tasks.run_sharded_counting_bytes, case.rank_kwargs())
    assert not any(a.error for a in answers), [a.error for a in answers]
    expected = {"shard agreement": 8 * 17 * world,
                "router block partial sums": 4 * world * batch * dim,
                "router scores": 4 * batch * queries * heads,
                "candidate threshold": 4 * world * batch * queries * 12,
                "selection merge": 8 * world * batch * queries * case.k_top}
    for answer in answers:
        assert answer.value == expected


@pytest.mark.parametrize("world", [2, 4])
def test_candidate_threshold_keeps_exactly_n_with_ties(rank_pools, world):
    """misa_hier keeps exactly n candidates over all ranks: every value above the n-th largest,
    and ties at it handed out until n are taken; -inf entries are never candidates."""
    gen = torch.Generator().manual_seed(5)
    # Few distinct values: many ties at every threshold.
    per_rank = [torch.randint(0, 4, (2, 3, 6), generator=gen).float() for _ in range(world)]
    per_rank[0][0, 0, :4] = float("-inf")
    every = torch.cat(per_rank, dim=-1)
    for keep in (1, 5, 6 * world - 2, 6 * world):
        answers = rank_pools(world).run(rank_tasks.run_global_top_members,
                                        [dict(values=v, keep=keep) for v in per_rank])
        assert not any(a.error for a in answers), [a.error for a in answers]
        members = torch.cat([a.value for a in answers], dim=-1)
        finite = torch.isfinite(every)
        threshold = every.topk(keep, dim=-1).values[..., -1:]
        assert torch.equal(members.sum(-1), torch.minimum(finite.sum(-1),
                                                          torch.tensor(keep)))
        assert (members <= finite).all()
        assert (members >= ((every > threshold) & finite)).all()
        assert (every[members] >= threshold.expand_as(every)[members]).all()
