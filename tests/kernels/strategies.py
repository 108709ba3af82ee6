"""Shared hypothesis strategies and selection checks for the kernel tests.

`indexer_problems()` draws a small indexer site: sizes (B, S, T >= S, H, D), k_top, active heads
h, router block size, HISA block size, a visibility kind (end-aligned causal, ragged key ranges,
boolean mask, additive mask, or everything visible) and a seed from which torch generates the
tensors, so every example is reproducible and hypothesis can shrink it.

The `naive_*` functions spell the semantics of ALGORITHM.md a second way (Python loops over heads,
blocks and queries, nothing shared with kernels/visibility.py), so that a bug in code shared by
the ops and kernels/reference.py still shows up.

Top-k ties are unspecified, so selections are never compared by index order: `assert_valid_topk`
accepts exactly the index sets that are a top-k of a float64 reference score up to ties."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

VISIBILITY_KINDS = ("causal", "ragged", "bool_mask", "additive_mask", "all_visible")
# The documented additive-mask policy: a bias at or below float16's lowest finite value hides the
# key (this covers -inf and the finfo(dtype).min fills that Hugging Face models use).
HIDING_BIAS = -65504.0

PROPERTY_SETTINGS = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                             suppress_health_check=(HealthCheck.too_slow,))


@dataclass(frozen=True)
class IndexerProblem:
    q: torch.Tensor          # [B, S, H, D]
    k: torch.Tensor          # [B, T, D]
    w: torch.Tensor          # [B, S, H]
    k_top: int
    active_heads: int
    block_size: int
    hisa_block: int
    visibility_kind: str
    causal: bool
    key_start: Optional[torch.Tensor] = None
    key_end: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def queries(self) -> int:
        return self.q.shape[1]

    @property
    def heads(self) -> int:
        return self.q.shape[2]

    @property
    def keys(self) -> int:
        return self.k.shape[1]

    def visibility(self) -> dict:
        """The visibility keyword arguments shared by every op and reference."""
        return dict(causal=self.causal, key_start=self.key_start, key_end=self.key_end,
                    mask=self.mask)

    def with_inputs(self, **tensors) -> "IndexerProblem":
        """The same site with some of q, k, w replaced."""
        return replace(self, **tensors)


@st.composite
def indexer_problems(draw, kinds=VISIBILITY_KINDS, dtype=torch.float32, max_batch=2,
                     max_queries=4, max_extra_keys=12, max_heads=4, max_dim=6):
    batch = draw(st.integers(1, max_batch))
    queries = draw(st.integers(1, max_queries))
    keys = queries + draw(st.integers(0, max_extra_keys))
    heads = draw(st.integers(1, max_heads))
    dim = draw(st.integers(1, max_dim))
    kind = draw(st.sampled_from(kinds))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    q = torch.randn(batch, queries, heads, dim, generator=gen).to(dtype)
    k = torch.randn(batch, keys, dim, generator=gen).to(dtype)
    w = torch.randn(batch, queries, heads, generator=gen).to(dtype)
    causal = kind == "causal" or (kind != "all_visible" and draw(st.booleans()))
    key_start = key_end = mask = None
    if kind == "ragged":
        ends = torch.randint(0, keys + 1, (2, batch, queries), generator=gen)
        key_start, key_end = ends.min(0).values, ends.max(0).values  # may be empty ranges
    elif kind == "bool_mask":
        mask = torch.rand(batch, queries, keys, generator=gen) < draw(st.sampled_from((0.3, 0.8)))
    elif kind == "additive_mask":
        mask = _additive_mask((batch, queries, keys), dtype, gen)
    return IndexerProblem(
        q=q, k=k, w=w,
        k_top=draw(st.integers(1, keys + 2)),
        active_heads=draw(st.integers(1, heads)),
        block_size=draw(st.integers(1, keys + 1)),
        hisa_block=draw(st.integers(1, keys + 1)),
        visibility_kind=kind, causal=causal, key_start=key_start, key_end=key_end, mask=mask)


def _additive_mask(shape, dtype, gen):
    """Half zeros, some finite biases that reorder keys, some -inf and some finfo.min (hidden)."""
    choice = torch.rand(shape, generator=gen)
    bias = torch.randn(shape, generator=gen) * 2
    mask = torch.where(choice < 0.5, 0.0, bias)
    mask = torch.where((choice >= 0.7) & (choice < 0.85), float("-inf"), mask)
    mask = mask.to(dtype)
    return torch.where(choice >= 0.85, torch.finfo(dtype).min, mask)


def distinct_heads(problem: IndexerProblem, seed: int, count: Optional[int] = None) -> torch.Tensor:
    """A random set of `count` (default h) distinct heads per query, int64 [B, S, count]."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(problem.batch, problem.queries, problem.heads, generator=gen)
    return noise.argsort(-1)[..., :count or problem.active_heads]


# --- independent spellings of the semantics -------------------------------------------------


def naive_visibility(problem: IndexerProblem) -> torch.Tensor:
    """bool [B, S, T], one query at a time, straight from the definition."""
    batch, queries, keys = problem.batch, problem.queries, problem.keys
    visible = torch.zeros(batch, queries, keys, dtype=torch.bool)
    for b in range(batch):
        for i in range(queries):
            lo, hi = 0, keys
            if problem.causal:
                hi = min(hi, keys - queries + i + 1)
            if problem.key_start is not None:
                lo = max(lo, int(problem.key_start[b, i]))
                hi = min(hi, int(problem.key_end[b, i]))
            for s in range(lo, hi):
                if problem.mask is None:
                    visible[b, i, s] = True
                elif problem.mask.dtype == torch.bool:
                    visible[b, i, s] = bool(problem.mask[b, i, s])
                else:
                    visible[b, i, s] = float(problem.mask[b, i, s]) > HIDING_BIAS
    return visible


def naive_scores(problem: IndexerProblem, heads: Optional[torch.Tensor] = None,
                 scale: float = 1.0) -> torch.Tensor:
    """float64 [B, S, T]: scale * sum over the given heads (all when None) of
    w * ReLU(q . k), plus the additive mask, -inf on hidden keys."""
    q, k, w = problem.q.double(), problem.k.double(), problem.w.double()
    if heads is None:
        heads = torch.arange(problem.heads).expand(problem.batch, problem.queries, -1)
    scores = torch.zeros(problem.batch, problem.queries, problem.keys, dtype=torch.float64)
    for slot in range(heads.shape[-1]):
        head = heads[..., slot]  # [B, S]
        q_head = q.gather(2, head[..., None, None].expand(-1, -1, 1, q.shape[-1]))[:, :, 0]
        w_head = w.gather(2, head[..., None])  # [B, S, 1]
        scores += w_head * torch.bmm(q_head, k.transpose(1, 2)).clamp_min(0)
    scores = scores * scale
    if problem.mask is not None and problem.mask.dtype != torch.bool:
        scores = scores + problem.mask.double()
    return scores.masked_fill(~naive_visibility(problem), float("-inf"))


def naive_block_means(problem: IndexerProblem, block: int) -> list[torch.Tensor]:
    """Mean key of each block of `block` keys (the last one over its valid keys), float64 [B, D]."""
    k = problem.k.double()
    return [k[:, start:start + block].mean(1) for start in range(0, problem.keys, block)]


def naive_router_scores(problem: IndexerProblem, block: int) -> torch.Tensor:
    """float64 [B, S, H]: |w| * sum over visible blocks of ReLU(q . mean key of the block)."""
    visible = naive_visibility(problem)
    q = problem.q.double()
    total = torch.zeros(problem.batch, problem.queries, problem.heads, dtype=torch.float64)
    for number, kbar in enumerate(naive_block_means(problem, block)):
        block_visible = visible[..., number * block:(number + 1) * block].any(-1)  # [B, S]
        total += torch.einsum("bshd,bd->bsh", q, kbar).clamp_min(0) * block_visible[..., None]
    return problem.w.double().abs() * total


def naive_hisa_block_scores(problem: IndexerProblem, block: int) -> torch.Tensor:
    """float64 [B, S, blocks]: the signed all-head block score, -inf for blocks with no visible
    key, +inf for the first and the last visible block (HISA always keeps those)."""
    visible = naive_visibility(problem)
    q, w = problem.q.double(), problem.w.double()
    columns = []
    for number, kbar in enumerate(naive_block_means(problem, block)):
        beta = (w * torch.einsum("bshd,bd->bsh", q, kbar).clamp_min(0)).sum(-1)
        block_visible = visible[..., number * block:(number + 1) * block].any(-1)
        columns.append(beta.masked_fill(~block_visible, float("-inf")))
    beta = torch.stack(columns, -1)
    for b in range(problem.batch):
        for i in range(problem.queries):
            seen = [n for n in range(beta.shape[-1])
                    if visible[b, i, n * block:(n + 1) * block].any()]
            if seen:
                beta[b, i, seen[0]] = beta[b, i, seen[-1]] = float("inf")
    return beta


# --- selection checks --------------------------------------------------------------------------


def assert_valid_topk(indices: torch.Tensor, reference: torch.Tensor, k: int,
                      values: Optional[torch.Tensor] = None, rel_tol: float = 1e-5,
                      tol: Optional[torch.Tensor] = None) -> None:
    """Checks that `indices` [..., n] select a top-k of `reference` [..., N] (float64, -inf where
    an entry may not be chosen), whatever the tie-breaking.

    With `values`, entries whose value is -inf are "no selection" slots (their index is
    meaningless); the other entries must carry the reference score of their index. Without
    `values`, every entry is a selection. Passes iff: the selections are distinct, in range and
    selectable; there are min(k, #selectable) of them; and no unselected selectable entry beats
    the weakest selection by more than the tolerance (`tol`, by default `rel_tol` times the
    row's largest finite magnitude)."""
    size = reference.shape[-1]
    if tol is None:
        tol = rel_tol * (1 + reference.nan_to_num(0, 0, 0).abs().amax(-1, keepdim=True))
    assert ((indices >= 0) & (indices < size)).all(), f"indices outside [0, {size}): {indices}"
    gathered = reference.gather(-1, indices.long())
    chosen = torch.ones_like(indices, dtype=torch.bool) if values is None else values.isfinite()
    assert not (values is not None and values.isnan().any()), f"NaN in selected values {values}"
    selectable = reference > float("-inf")  # +inf is a (forced) winner, NaN never selectable
    bad = chosen & ~(gathered > float("-inf"))
    assert not bad.any(), f"selected entries that may not be chosen: {indices[bad]}"
    if values is not None:
        same = gathered == values.double()  # also equal infinities, whose difference is NaN
        error = torch.where(chosen & ~same, (gathered - values.double()).abs(), 0.0)
        assert (error <= tol).all(), (
            f"selected values differ from the reference scores by up to "
            f"{error.max().item():.3g}\nvalues {values}\nreference {gathered}")
    counts = torch.zeros(indices.shape[:-1] + (size + 1,), dtype=torch.int64)
    counts.scatter_add_(-1, torch.where(chosen, indices.long(), size),
                        torch.ones_like(indices, dtype=torch.int64))
    member = counts[..., :size]
    assert member.max() <= 1, f"an index is selected twice: {indices}"
    expected = selectable.sum(-1).clamp(max=k)
    assert torch.equal(chosen.sum(-1), expected), (
        f"selection sizes {chosen.sum(-1).tolist()} != min(k={k}, selectable) {expected.tolist()}")
    weakest = torch.where(chosen, gathered, float("inf")).amin(-1, keepdim=True)
    unselected = torch.where((member > 0) | ~selectable, float("-inf"), reference)
    strongest_left = unselected.amax(-1, keepdim=True)
    beaten = strongest_left > weakest + tol
    assert not beaten.any(), (f"an unselected entry scores {strongest_left[beaten].tolist()} above "
                              f"the weakest selection {weakest[beaten].tolist()}")


def selection_sets(values: torch.Tensor, indices: torch.Tensor) -> list[frozenset]:
    """The finite-score indices of every query, as sets (order and -inf slots ignored)."""
    rows_values = values.reshape(-1, values.shape[-1])
    rows_indices = indices.reshape(-1, indices.shape[-1])
    return [frozenset(i.tolist() for i, v in zip(row_i, row_v) if torch.isfinite(v))
            for row_i, row_v in zip(rows_indices, rows_values)]


def head_sets(heads: torch.Tensor) -> list[frozenset]:
    return [frozenset(row.tolist()) for row in heads.reshape(-1, heads.shape[-1])]
