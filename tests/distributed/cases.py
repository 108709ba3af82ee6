"""Sharded indexer test cases and their comparison with the single-device op.

Inputs are small integers stored in float32 (|q|, |k| <= 4, |w| <= 20, D <= 6, H <= 5) and scales
are powers of two: every index score is then an exact integer in float32 whatever the order of
summation, so the sharded and single-device selections can be compared exactly. Only the router,
whose block means are fractions, is compared by margin: a query whose h-th and (h+1)-th router
scores are closer than ROUTER_MARGIN (relative) has no well-defined head set and is not compared;
likewise a misa_hier query with a tie at the candidate boundary."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from hypothesis import strategies as st

from misa_compile import MisaConfig, indexer_topk
from misa_compile.kernels import reference

ROUTER_MARGIN = 1e-3


@dataclass
class ShardedCase:
    q: torch.Tensor
    k: torch.Tensor
    w: torch.Tensor
    k_top: int
    config: MisaConfig
    offsets: list[int]
    sizes: list[int]
    causal: bool = True
    key_start: Optional[torch.Tensor] = None
    key_end: Optional[torch.Tensor] = None
    scale: float = 1.0

    @property
    def total_keys(self) -> int:
        return self.k.shape[1]

    def rank_kwargs(self) -> list[dict]:
        return [dict(q=self.q, k_local=self.k[:, off:off + size], w=self.w, k_top=self.k_top,
                     config=self.config, key_offset=off, total_keys=self.total_keys,
                     scale=self.scale, causal=self.causal, key_start=self.key_start,
                     key_end=self.key_end)
                for off, size in zip(self.offsets, self.sizes)]

    def single_device(self):
        return indexer_topk(self.q, self.k, self.w, self.k_top, self.config, scale=self.scale,
                            causal=self.causal, key_start=self.key_start, key_end=self.key_end)

    @property
    def visibility(self) -> dict:
        return dict(causal=self.causal, key_start=self.key_start, key_end=self.key_end)


def integer_tensor(gen: torch.Generator, shape, low: int, high: int) -> torch.Tensor:
    return torch.randint(low, high + 1, shape, generator=gen).float()


def shards_from_cuts(total: int, cuts: list[int], order: list[int]) -> tuple[list, list]:
    """Shard i is [bounds[i], bounds[i+1]); rank order[i] holds shard i."""
    bounds = [0] + sorted(cuts) + [total]
    offsets, sizes = [0] * len(order), [0] * len(order)
    for shard, rank in enumerate(order):
        offsets[rank], sizes[rank] = bounds[shard], bounds[shard + 1] - bounds[shard]
    return offsets, sizes


@st.composite
def sharded_cases(draw, world: int, variants=("dense", "misa", "misa_hier")) -> ShardedCase:
    variant = draw(st.sampled_from(variants))
    batch = draw(st.integers(1, 2))
    queries = draw(st.integers(1, 5))
    heads = draw(st.integers(1, 5))
    dim = draw(st.integers(2, 6))
    total = draw(st.integers(1, 40))
    cuts = draw(st.lists(st.integers(0, total), min_size=world - 1, max_size=world - 1))
    order = draw(st.permutations(range(world)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q = integer_tensor(gen, (batch, queries, heads, dim), -2, 4)
    k = integer_tensor(gen, (batch, total, dim), -2, 4)
    magnitude = integer_tensor(gen, (batch, queries, heads), 1, 20)
    w = magnitude * (integer_tensor(gen, (batch, queries, heads), 0, 1) * 2 - 1)
    k_top = draw(st.integers(1, total + 3))
    config = MisaConfig(variant=variant, active_heads=draw(st.integers(1, heads)),
                        block_size=draw(st.integers(1, 12)),
                        candidates=draw(st.integers(k_top, k_top + total)),
                        router=draw(st.sampled_from(("score", "score", "qnorm"))))
    key_start = key_end = None
    if draw(st.booleans()):
        key_start = torch.randint(-2, total + 1, (batch, queries), generator=gen)
        key_end = torch.randint(0, total + 3, (batch, queries), generator=gen)
    offsets, sizes = shards_from_cuts(total, cuts, list(order))
    # End-aligned causality needs at least as many keys as queries.
    causal = total >= queries and draw(st.booleans())
    return ShardedCase(q, k, w, k_top, config, offsets, sizes, causal=causal,
                       key_start=key_start, key_end=key_end,
                       scale=draw(st.sampled_from((1.0, 0.5, 2.0))))


def comparable_rows(case: ShardedCase, heads: torch.Tensor) -> torch.Tensor:
    """bool [B, S]: queries whose selection is well defined up to ties at the top-k boundary."""
    config = case.config
    rows = torch.ones(case.q.shape[:2], dtype=torch.bool)
    if config.variant == "dense":
        return rows
    if config.active_heads < case.q.shape[2]:
        if config.router == "qnorm":
            r = case.q.double().norm(dim=-1)
        else:
            r = reference.router_scores(case.q, case.k, case.w, config.block_size,
                                        **case.visibility)
        ranked = r.sort(dim=-1, descending=True).values
        h = config.active_heads
        gap = ranked[..., h - 1] - ranked[..., h]
        rows &= gap > ROUTER_MARGIN * (1 + ranked[..., h - 1].abs())
    if config.variant == "misa_hier":
        routed = reference.routed_scores(case.q, case.k, case.w, heads, case.scale,
                                         **case.visibility)
        n = config.candidates
        finite = torch.isfinite(routed).sum(-1)
        if routed.shape[-1] > n:
            ranked = routed.sort(dim=-1, descending=True).values
            rows &= (finite <= n) | (ranked[..., n - 1] > ranked[..., n])
    return rows


def variant_scores(case: ShardedCase, heads: torch.Tensor) -> torch.Tensor:
    """float64 [B, S, T] scores the final selection ranks by (exact for integer inputs)."""
    if case.config.variant == "misa":
        return reference.routed_scores(case.q, case.k, case.w, heads, case.scale,
                                       **case.visibility)
    return reference.dense_scores(case.q, case.k, case.w, case.scale, **case.visibility)


def single_device_heads(case: ShardedCase) -> torch.Tensor:
    c = case.config
    if c.variant == "dense":
        return torch.arange(case.q.shape[2]).expand(*case.q.shape[:2], -1)
    return torch.ops.misa.route_heads(case.q, case.k, case.w, c.active_heads, c.block_size,
                                      c.router, **case.visibility)


def assert_matches_single_device(case: ShardedCase, per_rank: list) -> tuple[int, int]:
    """Checks every rank's (values, indices) against the single-device op; returns (rows
    compared, rows in total)."""
    values, indices = per_rank[0]
    for rank, (v, i) in enumerate(per_rank[1:], start=1):
        assert torch.equal(v, values) and torch.equal(i, indices), f"rank {rank} differs from 0"
    ref_values, ref_indices = case.single_device()
    assert values.shape == ref_values.shape and values.dtype == torch.float32
    assert indices.dtype == torch.int64
    assert ((indices >= 0) & (indices < case.total_keys)).all()
    heads = single_device_heads(case)
    rows = comparable_rows(case, heads)
    scores = variant_scores(case, heads)
    for b, s in rows.nonzero().tolist():
        _assert_same_row(values[b, s], indices[b, s], ref_values[b, s], ref_indices[b, s],
                         scores[b, s], where=f"query (b={b}, s={s})")
    return int(rows.sum()), rows.numel()


def _assert_same_row(values, indices, ref_values, ref_indices, scores, where: str) -> None:
    assert torch.equal(values.sort().values, ref_values.sort().values), (
        f"{where}: selected values differ: {values.tolist()} vs {ref_values.tolist()}")
    finite = torch.isfinite(values)
    chosen = indices[finite]
    assert chosen.unique().numel() == chosen.numel(), f"{where}: a key is selected twice"
    torch.testing.assert_close(scores[chosen], values[finite].double(), rtol=0, atol=0,
                               msg=f"{where}: indices do not hold the returned scores")
    if finite.any():
        # Keys strictly above the k-th value are forced; ties at it may go either way.
        kth = values[finite].min()
        ref_finite = torch.isfinite(ref_values)
        forced = set(indices[finite & (values > kth)].tolist())
        ref_forced = set(ref_indices[ref_finite & (ref_values > kth)].tolist())
        assert forced == ref_forced, f"{where}: selected key sets differ"


def with_config(case: ShardedCase, **changes) -> ShardedCase:
    return dataclasses.replace(case, config=dataclasses.replace(case.config, **changes))
