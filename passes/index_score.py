"""The index score from the top-k input down to the head reduction: views and casts (a cast that
rounds is remembered), positive scales, masks (an additive bias, or a boolean condition filling
hidden scores with -inf or a value at or below HIDDEN_BIAS), run-time Python numbers, then the
weighted head sum whose factor holding q.k is the per-head score (per_head_score.py). What is not
an indexer's (a negative or unknown scale, a bias after a rounding cast, an unknown fill) is
recorded as an issue for the roles to refuse."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch.fx import Node

from . import aten_ops as ops
from . import reasons as R
from .axis_labels import Dims, LayoutError
from .contractions import Contraction, parse_contraction
from .indexer_site import Mask, Operand
from .per_head_score import ScoreBranch, per_head_score, score_rank
from .scalar_factors import scale_issue, scalar_step
from .search import TopkSearch, broadcast_dims, describe

aten = torch.ops.aten


@dataclass
class IndexScore:
    """What lies between the top-k input and the head reduction."""

    reduction: Contraction
    branch: ScoreBranch
    weights: list[Operand]
    masks: list[Mask] = field(default_factory=list)
    scale: float = 1.0
    runtime: list[Node] = field(default_factory=list)  # run-time Python scalars after the sum
    interior: list[Node] = field(default_factory=list)
    issues: list[tuple[str, str]] = field(default_factory=list)
    rounded_by: Optional[Node] = None  # a cast below that rounds the index score


def index_score(search: TopkSearch, node: Any, dims: Dims,
                lookahead: bool = False) -> Optional[IndexScore]:
    """From the top-k input down to the head reduction; None when no indexer lies below."""
    search.visit()
    if not isinstance(node, Node) or node.op != "call_function" \
            or ops.tensor_val(node) is None:
        return None
    target = node.target
    found: Optional[IndexScore] = None
    if ops.is_value_preserving(node):
        found = index_score(search, node.args[0], ops.input_dims(search.space, node, dims),
                            lookahead)
        # Rounding keeps the order weakly (ties may appear, never swaps), so the exact
        # score's top-k is one of the rounded score's; only what is added after it matters.
        if found is not None and ops.is_rounding_cast(node):
            found.rounded_by = node
    elif target in ops.MULS or target in ops.DIVS or target == aten.neg.default:
        found = _scaled(search, node, dims, lookahead)
    elif target in ops.ADDS or target in ops.SUBS:
        found = _added(search, node, dims)
    elif target in ops.WHERES or target in ops.MASKED_FILLS:
        found = _filled(search, node, dims)
    else:
        reduction = parse_contraction(search, node, dims)
        if reduction is not None:
            return _head_reduction(search, reduction)
    if found is not None:
        found.interior.append(node)
        return found
    if lookahead:
        _report_unknown_op(search, node)
    return None


def _scaled(search: TopkSearch, node: Node, dims: Dims, lookahead: bool) -> Optional[IndexScore]:
    step = scalar_step(node)
    if step is not None:
        factor, operand = step
        found = index_score(search, operand, broadcast_dims(dims, operand), lookahead)
        if found is not None:
            issue = scale_issue(factor, "the index score")
            if issue:
                found.issues.insert(0, issue)
            else:
                found.scale *= factor
                for mask in found.masks:
                    mask.factor *= factor
        return found
    hits = search.score_operands(node, dims, lambda n, d: index_score(search, n, d))
    if len(hits) != 1 or (node.target in ops.DIVS and hits[0][0] is not node.args[0]):
        return None
    found, other = hits[0][1], hits[0][2]
    if node.target in ops.MULS and search.is_python_scalar(other):
        if found.masks:
            # c * masked(score): a negative c turns the hidden keys' -inf into +inf (they
            # win) and c = 0 turns it into NaN, so no fold is exact for every c.
            found.issues.insert(0, (R.UNKNOWN_SCALE, f"{describe(node)} multiplies the masked "
                                    f"index score by {other.name}, a run-time Python "
                                    "number: a negative or zero value would un-hide "
                                    "masked keys"))
        else:
            found.runtime.append(other)
        return found
    found.issues.insert(0, (R.UNKNOWN_SCALE, f"{describe(node)} multiplies the index score by "
                            f"{other.name}, a tensor of unknown sign"))
    return found


def _added(search: TopkSearch, node: Node, dims: Dims) -> Optional[IndexScore]:
    """score + bias, or score - bias (a bias with factor -1): an additive mask."""
    hits = search.score_operands(node, dims, lambda n, d: index_score(search, n, d))
    if len(hits) != 1:
        return None
    score, found, other = hits[0]
    alpha = node.kwargs.get("alpha", 1)
    mask_val = ops.tensor_val(other)
    if alpha != 1 or mask_val.dtype not in ops.FLOAT_DTYPES:
        found.issues.insert(0, (R.UNKNOWN_MASK, f"{describe(node)} adds {other.name} "
                                f"({mask_val.dtype}, alpha={alpha}) to the index score"))
        return found
    if node.target in ops.SUBS and score is node.args[1]:
        found.issues.insert(0, (R.NEGATIVE_SCALE, f"{describe(node)} subtracts the index score "
                                "from a bias (a factor of -1)"))
        return found
    if found.rounded_by is not None:
        # round(a) + bias_a vs round(b) + bias_b: keys the rounding made equal (or nearly)
        # are ranked by the bias in eager, by the exact score in the ops.
        rounded_dtype = ops.tensor_val(found.rounded_by).dtype
        found.issues.insert(0, (R.ROUNDING_CAST, f"{describe(node)} adds {other.name} after "
                                f"{describe(found.rounded_by)} rounds the index score to "
                                f"{rounded_dtype}: the bias can reorder keys the rounding "
                                "tied"))
        return found
    operand = search.follow(other, broadcast_dims(dims, other))
    found.masks.append(Mask("additive", operand,
                            factor=-1.0 if node.target in ops.SUBS else 1.0))
    return found


def _filled(search: TopkSearch, node: Node, dims: Dims) -> Optional[IndexScore]:
    target = node.target
    if target in ops.MASKED_FILLS:
        condition, branches, hidden_when = node.args[1], [node.args[0], node.args[2]], True
    else:
        condition, branches = node.args[0], [node.args[1], node.args[2]]
        hidden_when = None  # decided by which branch holds the score
    tensor_branches = [b for b in branches if isinstance(b, Node)]
    known = [b for b in tensor_branches if ops.scalar_value(b) is not None]
    candidates = [b for b in tensor_branches if b not in known]
    if len(candidates) != 1:
        return None
    score = candidates[0]
    found = index_score(search, score, broadcast_dims(dims, score))
    if found is None:
        return None
    fill = [b for b in branches if b is not score][0]
    fill_value = ops.scalar_value(fill)
    if hidden_when is None:
        hidden_when = score is branches[1]  # where(c, fill, score): c marks hidden keys
    if fill_value is None or not fill_value <= ops.HIDDEN_BIAS:
        shown = "a non-constant tensor" if fill_value is None else f"{fill_value:g}"
        found.issues.insert(0, (R.UNKNOWN_MASK, f"{describe(node)} replaces masked scores by "
                                f"{shown}, not -inf"))
        return found
    if ops.tensor_val(condition) is None or ops.tensor_val(condition).dtype != torch.bool:
        found.issues.insert(0, (R.UNKNOWN_MASK, f"{describe(node)} has a non-boolean condition"))
        return found
    operand = search.follow(condition, broadcast_dims(dims, condition), negations=True)
    found.masks.append(Mask("bool", operand, invert=hidden_when, fill=fill_value))
    return found


def _report_unknown_op(search: TopkSearch, node: Node) -> None:
    """An op the pass does not understand right above an indexer: say so, instead of
    silently passing over the site."""
    for source in node.all_input_nodes:
        source_val = ops.tensor_val(source)
        if source_val is None or source_val.dim() == 0:
            continue
        try:
            below = index_score(search, source, search.space.fresh_dims(source_val.shape))
        except LayoutError:
            below = None
        if below is not None and below.branch.relu is not None and not below.issues:
            raise R.SiteRefused(R.UNSUPPORTED_LAYOUT, f"{describe(node)} between the head "
                                "reduction and top-k is not understood")


def _head_reduction(search: TopkSearch, reduction: Contraction) -> Optional[IndexScore]:
    hits = []
    for i, (node, dims) in enumerate(reduction.factors):
        branch = per_head_score(search, node, dims, above=True)
        if branch is not None:
            hits.append((i, branch))
    if len(hits) > 1:
        # Weights can be an activation of a contraction too (softmax(x @ Wp)): the score is
        # the branch whose bilinear form reads the top-k axis, then the one with a ReLU.
        ranked = sorted(hits, key=lambda hit: score_rank(search, hit[1]), reverse=True)
        if score_rank(search, ranked[0][1]) == score_rank(search, ranked[1][1]):
            return None
        hits = ranked[:1]
    if not hits:
        return None
    index, branch = hits[0]
    weights = [search.follow(n, d) for i, (n, d) in enumerate(reduction.factors) if i != index]
    found = IndexScore(reduction, branch, weights + branch.weights)
    issue = scale_issue(reduction.scale, "the weighted head sum")
    if issue:
        found.issues.append(issue)
    found.interior.extend(reduction.interior)
    return found
