"""The roles and proofs of a parsed indexer: which operand of q.k is q (it varies along the summed
head axis) and which is k (shared by all heads, varying only along the keys), that top-k runs
along the keys with largest=True, the batch, query, head and D axes and their layout, the
per-head weights, and what the rewrite must not change: the dense scores used nowhere else,
the top-k values used only where the ops report them as eager does. Anything that fails is a
SiteRefusal with its reason code."""
from __future__ import annotations

from typing import Any

import torch
from torch.fx import Node

from . import aten_ops as ops
from . import reasons as R
from .axis_labels import Dims, LabelSpace, LayoutError, concrete, size_hint
from .index_score import IndexScore
from .indexer_site import IndexerSite, Mask, Match, Operand, mask_kind, site_name
from .mask_algebra import Bias, FloatConst, MaskAlgebra

aten = torch.ops.aten
from .search import NotAnIndexer, TopkSearch


def prove_roles(search: TopkSearch, outer: IndexScore, score_dims: Dims, top: int,
                k_top: Any, dtype: torch.dtype) -> Match:
    space = search.space
    branch = outer.branch
    search.known["mask"] = mask_kind(outer.masks)
    (a, a_dims), (b, b_dims) = branch.bilinear.factors
    fa, fb = search.follow(a, a_dims), search.follow(b, b_dims)
    deps_a, deps_b = fa.depends(space), fb.depends(space)
    heads = [x for label in outer.reduction.summed for x in space.resolve(label)]
    dims_d = [x for label in branch.bilinear.summed for x in space.resolve(label)]
    # Only a top-k over an axis of q or k, summed over an axis of q or k, is an indexer at
    # all; anything else is some other contraction chain and is not reported.
    if top not in deps_a | deps_b or len(heads) != 1 or heads[0] not in deps_a | deps_b:
        raise NotAnIndexer()
    head = heads[0]
    issues = outer.issues + branch.issues
    if issues:
        raise R.SiteRefused(*issues[0])
    if ops.arg(search.topk, 3, "largest", True) is not True:
        raise R.SiteRefused(R.SMALLEST_TOPK, "top-k selects the smallest scores "
                            "(largest=False)")
    if head in deps_a and head in deps_b:
        raise R.SiteRefused(R.PER_HEAD_KEYS, "both operands of the bilinear form vary along "
                            "the summed head axis")
    q, k = (fa, fb) if head in deps_a else (fb, fa)
    q_deps, k_deps = q.depends(space), k.depends(space)
    if top in q_deps:
        raise R.SiteRefused(R.TOPK_NOT_KEY_AXIS, "top-k runs along an axis of the query "
                            "operand, not along the keys")
    if len(dims_d) != 1 or dims_d[0] not in q_deps or dims_d[0] not in k_deps:
        raise R.SiteRefused(R.UNSUPPORTED_LAYOUT, "the bilinear form does not contract one "
                            "axis shared by both operands")
    dim = dims_d[0]
    batch = sorted((q_deps & k_deps) - {dim})
    q_own = sorted(q_deps - k_deps - {dim})
    k_own = sorted(k_deps - q_deps - {dim})
    if k_own != [top]:
        code = R.REDUCTION_NOT_OVER_HEADS if len(q_own) == 1 else R.UNSUPPORTED_LAYOUT
        raise R.SiteRefused(code, f"the shared operand varies along {len(k_own)} axes "
                            "besides the contracted one; a key varies only along the keys")
    if not _head_right_before_dim(space, q, head, dim):
        raise R.SiteRefused(R.REDUCTION_NOT_OVER_HEADS, "the summed axis is not the query's "
                            "head axis (the axis right before D in [.., S, H, D])")
    queries = [x for x in q_own if x != head]
    if len(batch) > 1 or len(queries) > 1:
        raise R.SiteRefused(R.UNSUPPORTED_LAYOUT, f"{len(batch)} batch and {len(queries)} "
                            "query axes (at most one of each is supported)")
    score_labels = set(space.flat(score_dims))
    if score_labels != set(batch) | set(queries) | {top}:
        raise R.SiteRefused(R.UNSUPPORTED_LAYOUT, "the top-k input has axes other than "
                            "batch, query and key")
    search.known["layout"] = "batch" if batch or len(q.source.dims) >= 4 else "flat"
    allowed = set(batch) | set(queries) | {head}
    runtime = [(n, "below") for n in branch.runtime_below] \
        + [(n, "above") for n in branch.runtime_above + outer.runtime]
    for weight in list(outer.weights):
        if search.is_python_scalar(weight.links[0].node):
            outer.weights.remove(weight)
            runtime.append((weight.links[0].node, "above"))
    weight_deps = [w.depends(space) for w in outer.weights]
    if not outer.weights:
        raise R.SiteRefused(R.UNSUPPORTED_LAYOUT, "no per-head weights multiply the heads")
    for weight, deps in zip(outer.weights, weight_deps):
        if not deps <= allowed:
            raise R.SiteRefused(R.UNSUPPORTED_LAYOUT, f"the weight {weight.source.node.name}"
                                " varies along an axis other than batch, query and head")
        if head not in deps:
            raise R.SiteRefused(R.UNKNOWN_SCALE, f"{weight.source.node.name} scales the "
                                "heads' sum with a tensor of unknown sign")
    # A symbolic H (a dynamic-shape graph input) is checked against the configuration with its
    # example value here; the misa ops check it again on every call.
    heads_count = concrete(space.size(head))
    if heads_count is None:
        heads_count = size_hint(space.size(head))
    search.known["heads"] = heads_count
    interior = _unique(outer.interior + branch.interior
                        + [outer.reduction.node, branch.bilinear.node])
    inside = set(interior) | {search.topk}
    # full_like(scores, -inf) and the like read only the shape: harmless if they feed the
    # site alone (they die with it).
    inside |= {u for n in interior for u in n.users
               if u.target in ops.SHAPE_READERS and set(u.users) <= inside}
    inside |= {u for n in interior for u in n.users if u.target in ops.METADATA_CHECKS}
    for node in interior:
        others = [u.name for u in node.users if u not in inside]
        if others:
            raise R.SiteRefused(R.SCORES_USED_ELSEWHERE, f"{node.name} (dense scores) is "
                                f"also used by {', '.join(others)}")
    try:
        outputs = ops.getitem_users(search.topk)
    except LayoutError as error:
        raise R.SiteRefused(R.UNSUPPORTED_LAYOUT, str(error)) from None
    if outputs.get(0):
        _refuse_finite_hiding(outer.masks)
    scale = branch.scale_below * branch.scale_above * outer.reduction.scale * outer.scale
    operands = [q, k] + outer.weights + [m.operand for m in outer.masks]
    return IndexerSite(
        name=site_name(search.topk), topk=search.topk, space=space, score_dims=score_dims,
        q=q, k=k, weights=outer.weights, masks=outer.masks, scale=scale, k_top=k_top,
        batch=batch[0] if batch else None, query=queries[0] if queries else None,
        head=head, dim=dim, key=top, heads=heads_count, dtype=dtype, interior=interior,
        operands=operands, runtime_factors=runtime)


def _head_right_before_dim(space: LabelSpace, q: Operand, head: int, dim: int) -> bool:
    """Whether q is laid out [.., S, H, D] (the summed axis right before D) as the contraction
    reads it or as its source holds it. Heads-first code (RoPE on [B,H,S,D], then transposed
    back, as DeepSeek-V4 does) still hands the contraction [.., S, H, D]; looking only at the
    source would take the query axis for the heads. A heads-first view in between decides
    nothing: through [B,H,S,D] a sum over the queries would pass for a sum over heads."""
    for link in (q.links[0], q.links[-1]):
        order = space.flat(link.dims)
        if head in order and dim in order and order.index(head) + 1 == order.index(dim):
            return True
    return False


def _refuse_finite_hiding(masks: list[Mask]) -> None:
    """The top-k values are used: refuse a mask that may hide a key with a finite value. The ops
    report a hidden key's value as -inf; eager reports the model's finite fill (or score +
    bias), and a row with fewer visible keys than k_top hands it on (a softmax over those values
    is uniform in eager and NaN after a rewrite)."""
    finite = [m.fill for m in masks if m.kind == "bool" and m.fill != float("-inf")]
    if finite:
        raise R.SiteRefused(R.UNKNOWN_MASK, f"the top-k values are used and the mask fills "
                            f"hidden keys with {finite[0]:g}, not -inf; the rewrite would "
                            "report -inf for them")
    algebra = MaskAlgebra()
    for mask in masks:
        issue = _finite_hiding_bias(algebra, mask) if mask.kind == "additive" else ""
        if issue:
            raise R.SiteRefused(R.UNKNOWN_MASK, f"the top-k values are used and {issue}; the "
                                "rewrite would report -inf for those keys")


def _finite_hiding_bias(algebra: MaskAlgebra, mask: Mask) -> str:
    """Why the additive `mask` may hide a key with a finite value ("" if it never does). The ops
    hide every key whose bias (times mask.factor, as they receive it) is at or below HIDDEN_BIAS;
    that matches eager's value only where the bias is -inf. Proven from the ops that build the
    bias (mask_algebra.py): a constant, or 0 where visible and -inf elsewhere; a bias read from an
    input or built by ops the algebra does not read may hold any value."""
    node = mask.operand.links[0].node
    value = algebra.value(node)
    if isinstance(value, FloatConst):
        added = value.value * mask.factor
        if added > ops.HIDDEN_BIAS or added == float("-inf"):
            return ""
        return f"the additive bias {node.name} adds {added:g} to every score"
    if isinstance(value, Bias):
        # Entries are 0 or at most value.hidden: a negative factor (a subtraction) makes them
        # 0 or large and positive, which hides nothing.
        if mask.factor < 0 or value.hidden == float("-inf"):
            return ""
        return (f"the additive bias {node.name} hides keys with a finite value (at most "
                f"{value.hidden * mask.factor:g})")
    if any(_minus_inf_triangle(algebra, link.node) for link in mask.operand.links):
        return ""
    return (f"the additive bias {node.name} is not proven to hide keys only with -inf (an entry "
            f"at or below {ops.HIDDEN_BIAS:g} hides its key)")


def _minus_inf_triangle(algebra: MaskAlgebra, node: Node) -> bool:
    """tril/triu of a -inf constant: every entry is 0 or -inf whatever the diagonal, so it hides
    keys with -inf only even where the algebra cannot place the diagonal (a symbolic size)."""
    if node.target not in (aten.tril.default, aten.triu.default):
        return False
    source = algebra.value(node.args[0])
    return isinstance(source, FloatConst) and source.value == float("-inf")


def _unique(nodes: list[Node]) -> list[Node]:
    return list(dict.fromkeys(nodes))
