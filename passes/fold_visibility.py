"""Which keys each query of an indexer site may see, in the cheapest form the misa ops take.

A site's masks (indexer_site.Mask) say what it hides. When a mask is built inside the graph,
mask_algebra.py proves what it computes; this module maps that onto the site's (batch, query,
key) axes and folds each proven condition on (query i, key j) into the ops' arguments:

  j <= i + (T - S)       ->  causal=True  (end-aligned: query i of S sees keys [0, T-S+i])
  j <= a*i + c,  j >= a*i + c (other ints)
                         ->  key_start / key_end [B,S] (static S and T only)
  L[b,j] >= L[b,i],  L[b,j] <= L[b,i]   (L a cumsum of a bool along its [B,N] rows, N == S == T)
                         ->  key_start = first index of i's run of equal labels in row b,
                             key_end = one past its last (SegmentBound; static S and T only)
  L[b,i] == L[b,j] and P[b,j] - P[b,i] + c >= 0, L proven to be P's packed-sequence labels
                         ->  the segment as above and j - i + c >= 0, folded as the bounds above

The last is transformers' create_causal_mask given position_ids P (always the case under
torch.compile, see find_packed_sequence_indices): P is a graph input of unknown values, but on one
run of equal labels P[j] - P[i] == j - i (mask_algebra.MaskAlgebra.within_segments), so a packed
causal mask becomes causal=True plus the segments' key ranges, and no [S,T] mask is read.

Only what is proven is folded: an offset equal to T - S only when that equality is statically
known (a run-time position offset is opaque to the algebra and stays in the mask). What cannot be
folded stays a mask: a bool graph node the algebra kept as a leaf (for a 2-D key-padding mask,
[B,1,T] broadcast to [B,S,T] with stride 0), or, when a mask cannot be split, the whole mask as
the site had it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from . import aten_ops as ops
from .axis_labels import Size, concrete, is_unit, same_size
from .indexer_site import IndexerSite, Link, Mask
from .mask_algebra import (Affine, Bias, FloatConst, Leaf, MaskAlgebra, Predicate, ReadSum,
                           label_difference, negate, same_affine)


@dataclass(frozen=True)
class KeyBound:
    """A key index bound linear in the query index i:  const + per_query * i."""

    const: int
    per_query: int


@dataclass(frozen=True)
class SegmentBound:
    """A key bound from labels L [B_L, N] that never decrease along N (a cumsum of a bool):
    side "start": key >= the first index of query i's run of equal labels, "end": key < one past
    its last. `row`: None reads row b of L for batch b (B_L == B), an int that one row for every
    batch."""

    labels: object
    row: Optional[int]
    side: str


@dataclass(frozen=True)
class KeptLeaf:
    """A bool graph node kept as (part of) the mask; dims label its dimensions with the site's
    axes (() where it has size 1); `negated`: its logical not is the visibility."""

    node: object
    dims: tuple
    negated: bool = False


@dataclass
class SiteVisibility:
    causal: bool = False
    starts: list = field(default_factory=list)      # KeyBound, SegmentBound: key >= each
    ends: list = field(default_factory=list)        # KeyBound, SegmentBound: key < each
    leaves: list = field(default_factory=list)      # KeptLeaf
    kept_masks: list = field(default_factory=list)  # Mask, kept whole

    @property
    def has_ranges(self) -> bool:
        return bool(self.starts or self.ends)

    @property
    def has_mask(self) -> bool:
        return bool(self.leaves or self.kept_masks)

    @property
    def form(self) -> str:
        """"causal", "ranges", "mask", combinations joined by "+", or "none"."""
        parts = [name for name, present in (("causal", self.causal),
                                            ("ranges", self.has_ranges),
                                            ("mask", self.has_mask)) if present]
        return "+".join(parts) or "none"


def plan_visibility(site: IndexerSite) -> SiteVisibility:
    """The site's masks, folded where proven; see the module docstring."""
    plan = SiteVisibility()
    algebra = MaskAlgebra()
    queries = site.space.size(site.query) if site.query is not None else 1
    keys = site.space.size(site.key)
    for mask in site.masks:
        folded = _fold_mask(algebra, site, mask, queries, keys)
        if folded is None:
            plan.kept_masks.append(mask)
            continue
        causal, starts, ends, leaves = folded
        plan.causal |= causal
        plan.starts += starts
        plan.ends += ends
        plan.leaves += leaves
    # Causal and ranges together stay together (the ops intersect them): causal=True is what
    # lets the GPU launchers skip, per chunk of queries, the key tiles past its last visible key,
    # which key ranges (run-time values) cannot tell them.
    return plan


def _fold_mask(algebra: MaskAlgebra, site: IndexerSite, mask: Mask, queries: Size, keys: Size):
    """(causal, starts, ends, leaves) for one mask, or None to keep it whole."""
    analysed = _visible_predicate(algebra, mask)
    if analysed is None:
        return None
    predicate, link = analysed
    if predicate.never:
        return None  # hides every key: rare enough to keep as it is
    roles = _roles(site, link)
    if roles is None:
        return None
    # Position bounds proven on one packed segment become bounds on the indices.
    predicate = algebra.within_segments(predicate, ops.shape(link.node))
    causal, starts, ends, leaves = False, [], [], []
    static = concrete(queries) is not None and concrete(keys) is not None
    for bound in predicate.bounds:
        per_role = _per_role(bound.expr, roles)
        kind = _bound_kind(bound.expr, per_role, queries, keys, static)
        if kind == "causal":
            causal = True
        elif kind == "end":
            const, per_query = concrete(bound.expr.const), per_role["query"]
            ends.append(KeyBound(const + 1, per_query))             # j <= c + a*i
        elif kind == "start":
            const, per_query = concrete(bound.expr.const), per_role["query"]
            starts.append(KeyBound(-const, -per_query))             # j >= -(c + a*i)
        else:
            kept = _kept(site, bound.leaf, link, roles)
            if kept is None:
                return None
            leaves.append(kept)
    for bound in predicate.read_bounds:
        segment = _segment_bound(algebra, site, bound.expr, roles, queries, keys) \
            if static else None
        if segment is not None:
            (starts if segment.side == "start" else ends).append(segment)
            continue
        kept = _kept(site, bound.leaf, link, roles)
        if kept is None:
            return None
        leaves.append(kept)
    for leaf in predicate.leaves:
        kept = _kept(site, leaf, link, roles)
        if kept is None:
            return None
        leaves.append(kept)
    return causal, starts, ends, leaves


def _visible_predicate(algebra: MaskAlgebra, mask: Mask) -> Optional[tuple[Predicate, Link]]:
    """What the mask lets through, as a Predicate in the coordinates of one of its links."""
    links = mask.operand.links
    if mask.kind == "bool":
        # The link nearest the consumer that marks visible keys (no logical not to undo).
        for link in links:
            if link.negated == mask.invert:
                value = algebra.value(link.node)
                return (value, link) if isinstance(value, Predicate) else None
        value = negate(algebra.value(links[0].node), None) \
            if isinstance(algebra.value(links[0].node), Predicate) else None
        return (value, links[0]) if value is not None else None
    value = algebra.value(links[0].node)
    if mask.factor <= 0:
        return None
    if isinstance(value, FloatConst) and value.value == 0:
        return Predicate(), links[0]
    # A hidden bias stays hidden once multiplied by the positive factors after it.
    if isinstance(value, Bias) and value.hidden * mask.factor <= ops.HIDDEN_BIAS:
        return value.visible, links[0]
    return None


def _roles(site: IndexerSite, link: Link) -> Optional[list]:
    """For each dimension of the link's node: "batch", "query", "key" or None (size 1)."""
    names = {site.batch: "batch", site.query: "query", site.key: "key"}
    roles = []
    for group in site.space.resolve_dims(link.dims):
        if not group:
            roles.append(None)
        elif len(group) == 1 and group[0] in names and group[0] is not None:
            roles.append(names[group[0]])
        else:
            return None
    return roles


def _per_role(expr: Affine, roles: list) -> dict:
    per_role = {"batch": 0, "query": 0, "key": 0}
    for coef, role in zip(expr.coefs, roles):
        if role is not None:
            per_role[role] = per_role[role] + coef
    return per_role


def _bound_kind(expr: Affine, per_role: dict, queries: Size, keys: Size, static: bool) -> str:
    """"causal", "end", "start", or "keep" (stays a mask) for  c + b*batch + a*i + d*j >= 0.
    Ranges need static sizes and integer coefficients (they are built in the graph from them)."""
    batch, per_query, per_key = (concrete(per_role[r]) for r in ("batch", "query", "key"))
    # With one query (decode) i is always 0, so its coefficient does not matter.
    causal_slope = per_query == 1 or is_unit(queries)
    if batch == 0 and causal_slope and per_key == -1 and same_size(expr.const, keys - queries):
        return "causal"  # j <= i + (T - S), the equality statically known
    if batch != 0 or per_query is None or per_key not in (-1, 1) or not static \
            or concrete(expr.const) is None:
        return "keep"
    return "end" if per_key == -1 else "start"


def _segment_bound(algebra: MaskAlgebra, site: IndexerSite, expr: ReadSum, roles: list,
                   queries: Size, keys: Size) -> Optional[SegmentBound]:
    """L[b,j] - L[b,i] >= 0 (key j at or after the start of query i's run: L never decreases)
    or L[b,i] - L[b,j] >= 0 (before its end), for L [B_L, N] a cumsum of a bool along N with
    N == S == T statically known, read in one row at the query and at the key index."""
    difference = label_difference(expr)
    if difference is None:
        return None
    labels, a, b = difference
    shape = ops.shape(labels)
    if len(shape) != 2 or algebra.nondecreasing(labels) != 1 \
            or not (same_size(shape[1], queries) and same_size(shape[1], keys)):
        return None
    if not same_affine(a[0], b[0]):
        return None  # two different rows (batches): not a run of one row
    row = _label_row(site, a[0], roles, shape[0])
    if row is False:
        return None
    if _is_axis(a[1], roles, "key") and _is_axis(b[1], roles, "query"):
        return SegmentBound(labels, row, "start")
    if _is_axis(a[1], roles, "query") and _is_axis(b[1], roles, "key"):
        return SegmentBound(labels, row, "end")
    return None


def _label_row(site: IndexerSite, coordinate: Affine, roles: list, rows: Size):
    """None when the labels' row is the batch index (B_L == B), the row index when it is one
    constant row, False otherwise."""
    batch = site.space.size(site.batch) if site.batch is not None else 1
    if _is_axis(coordinate, roles, "batch") and same_size(rows, batch):
        return None
    row = concrete(coordinate.const) if coordinate.is_constant else None
    if row is not None and concrete(rows) is not None and 0 <= row < concrete(rows):
        return row
    return False


def _is_axis(expr: Affine, roles: list, role: str) -> bool:
    """expr is exactly the index along the site's `role` axis."""
    ones = [d for d, c in enumerate(expr.coefs) if not same_size(c, 0)]
    return same_size(expr.const, 0) and len(ones) == 1 and roles[ones[0]] == role \
        and same_size(expr.coefs[ones[0]], 1)


def _kept(site: IndexerSite, leaf: Optional[Leaf], link: Link, roles: list) -> Optional[KeptLeaf]:
    if leaf is None:
        return None
    labels = {"batch": site.batch, "query": site.query, "key": site.key}
    dims = tuple(() if d is None or roles[d] is None else (labels[roles[d]],)
                 for d in leaf.dims)
    return KeptLeaf(leaf.node, dims, leaf.negated)
