"""The per-head score below the head reduction: [scale] ReLU([scale] q.k), with the scales on
either side of the activation, tensor factors after it (part of the per-head weights), run-time
Python numbers, and what is not an indexer's (another activation, a gated one, a rounding cast,
a factor of unknown sign) recorded as issues for the roles to refuse."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch.fx import Node

from . import aten_ops as ops
from . import reasons as R
from .axis_labels import Dims
from .contractions import Contraction, parse_contraction
from .indexer_site import Operand
from .scalar_factors import scalar_step, scale_issue
from .search import TopkSearch, broadcast_dims, describe

aten = torch.ops.aten


@dataclass
class ScoreBranch:
    """The per-head score below the head reduction: [scale] ReLU([scale] bilinear)."""

    bilinear: Contraction
    relu: Optional[Node]
    scale_below: float = 1.0   # between the bilinear form and the activation
    scale_above: float = 1.0   # between the activation and the head reduction
    weights: list[Operand] = field(default_factory=list)  # tensor factors above the activation
    # Python numbers passed to the graph as 0-d tensors (Dynamo's unspecialised floats), whose
    # sign is only known at run time: below / above the activation.
    runtime_below: list[Node] = field(default_factory=list)
    runtime_above: list[Node] = field(default_factory=list)
    interior: list[Node] = field(default_factory=list)
    issues: list[tuple[str, str]] = field(default_factory=list)


def per_head_score(search: TopkSearch, node: Any, dims: Dims,
                   above: bool) -> Optional[ScoreBranch]:
    """From a factor of the head reduction down to the bilinear form. `above` is True until
    the activation has been passed."""
    search.visit()
    if not isinstance(node, Node) or node.op != "call_function" \
            or ops.tensor_val(node) is None:
        return None
    target = node.target
    where = "after the activation" if above else "before the activation"
    branch: Optional[ScoreBranch] = None
    if ops.is_value_preserving(node):
        branch = per_head_score(search, node.args[0], ops.input_dims(search.space, node, dims),
                                above)
        if branch is not None and ops.is_rounding_cast(node):
            # Rounded per-head terms summed over heads rank keys differently from the exact
            # terms the ops sum (not a monotone function of the exact score).
            branch.issues.insert(0, (R.ROUNDING_CAST, f"{describe(node)} rounds the per-head "
                                     f"score {where} to {ops.tensor_val(node).dtype} "
                                     "before the head sum"))
    elif ops.relu_input(node) is not None:
        branch = per_head_score(search, ops.relu_input(node), dims, above=False)
        if branch is not None and branch.relu is None:
            branch.relu = node
    elif target in ops.MULS or target in ops.DIVS or target == aten.neg.default:
        step = scalar_step(node)
        if step is not None:
            factor, operand = step
            branch = per_head_score(search, operand, broadcast_dims(dims, operand), above)
            if branch is not None:
                issue = scale_issue(factor, f"the per-head score {where}")
                if issue:
                    branch.issues.insert(0, issue)
                elif above:
                    branch.scale_above *= factor
                else:
                    branch.scale_below *= factor
        else:
            hits = search.score_operands(node, dims,
                                         lambda n, d: per_head_score(search, n, d, above))
            if target in ops.DIVS and hits and hits[0][0] is not node.args[0]:
                hits = []  # c / score: not a scaled score
            if len(hits) == 2:
                branch = hits[0][1]
                branch.issues.insert(0, (R.NOT_RELU, f"{describe(node)} multiplies the score by "
                                         "a function of itself (a gated activation)"))
            elif len(hits) == 1:
                _, branch, other = hits[0]
                if target in ops.MULS and search.is_python_scalar(other):
                    (branch.runtime_above if above else branch.runtime_below).append(other)
                elif above and target in ops.MULS:
                    branch.weights.append(search.follow(other, broadcast_dims(dims, other)))
                else:
                    branch.issues.insert(0, (R.UNKNOWN_SCALE, f"{describe(node)} scales the "
                                             f"score {where} by {other.name}, a tensor of "
                                             "unknown sign"))
    else:
        bilinear = parse_contraction(search, node, dims)
        if bilinear is not None:
            # No activation between the two contractions: a chain of linear maps, not an
            # indexer.
            if above or len(bilinear.factors) != 2:
                return None
            branch = ScoreBranch(bilinear, None, interior=list(bilinear.interior))
            issue = scale_issue(bilinear.scale, "the bilinear form")
            if issue:
                branch.issues.append(issue)
            else:
                branch.scale_below *= bilinear.scale
            return branch
        if _is_unary(node):
            branch = per_head_score(search, node.args[0], dims, above=False)
            if branch is not None:
                branch.issues.insert(0, (R.NOT_RELU, f"{describe(node)} is applied to the "
                                         "per-head score"))
    if branch is not None:
        branch.interior.append(node)
    return branch


def score_rank(search: TopkSearch, branch: ScoreBranch) -> tuple[bool, bool, bool]:
    top = set(search.space.resolve(search.top_label)) if search.top_label is not None else set()
    reads_top = any(top & set(search.space.flat(search.follow(n, d).source.dims))
                    for n, d in branch.bilinear.factors)
    return reads_top, branch.relu is not None, not branch.issues


def _is_unary(node: Node) -> bool:
    """An elementwise function of one tensor (an activation other than ReLU, a power, ...)."""
    inputs = [a for a in node.all_input_nodes if ops.tensor_val(a) is not None]
    if len(inputs) != 1 or node.args[0] is not inputs[0]:
        return False
    return tuple(ops.shape(inputs[0])) == tuple(ops.shape(node))
