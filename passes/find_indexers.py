"""Find DSA lightning indexers in an ATen graph by what they compute, not by how they are spelled.

Every aten.topk is a candidate. From its input the matcher walks down the graph with axis labels
(axis_labels.py) and proves, piece by piece:

    top-k input  = [mask] [positive scale] REDUCTION over one axis h of
                   (per-head weights w) x [positive scale] ReLU([positive scale] q . k over D)

where the reduction is a sum/mean of a product, a bmm/mm or an einsum; the bilinear form is a
bmm/mm/einsum or a sum of a product; casts and views may sit anywhere in between. From the labels
each source tensor carries it then proves the roles: q varies along (batch, query, head, D), k
along (batch, key, D) only (one key shared by all heads), w along (batch, query, head) only,
the top-k runs along the key axis, the mask along (batch, query, key) only.

A top-k whose input has no contraction-of-an-activation-of-a-contraction below it is not an
indexer and is not reported. A top-k that has that core but breaks a rule is returned as a
SiteRefusal with a reason code (reasons.py); only a fully proven IndexerSite may be rewritten."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Union

import torch
from torch.fx import Graph, GraphModule, Node

from . import aten_ops as ops
from . import reasons as R
from .axis_labels import Dims, LabelSpace, LayoutError, concrete, is_unit, size_hint
from .mask_algebra import Bias, FloatConst, MaskAlgebra

aten = torch.ops.aten
logger = logging.getLogger("misa_compile")

# Nodes the matcher may look at per top-k: enough for any indexer spelling, small enough that a
# top-k deep inside unrelated code gives up quickly.
VISIT_BUDGET = 600


@dataclass
class Link:
    node: Node
    dims: Dims
    negated: bool = False  # a boolean operand reached through an odd number of logical nots


@dataclass
class Operand:
    """A tensor the indexer reads, with the chain of value-preserving ops that feeds it: links[0]
    is what the consuming op sees, links[-1] the source that produced the values."""

    links: list[Link]

    @property
    def source(self) -> Link:
        return self.links[-1]

    def depends(self, space: LabelSpace) -> set[int]:
        return set(space.flat(self.source.dims))

    def pick(self, space: LabelSpace, negated: Optional[bool] = None) -> Link:
        """The link nearest the consumer whose dimensions are each one axis (or size 1) and carry
        exactly the axes the values depend on: it can be rearranged with squeeze/permute only.
        `negated`, when given, prefers a link of that polarity (saves a logical not)."""
        wanted = self.depends(space)
        good = []
        for link in self.links:
            dims = space.resolve_dims(link.dims)
            labels = [g[0] for g in dims if g]
            if all(len(g) <= 1 for g in dims) and len(set(labels)) == len(labels) \
                    and set(labels) == wanted:
                good.append(link)
        if negated is not None:
            preferred = [link for link in good if link.negated == negated]
            good = preferred or good
        return good[0] if good else self.source


@dataclass
class Mask:
    kind: str            # "bool" (True = visible once `invert` is applied) or "additive"
    operand: Operand
    invert: bool = False  # bool masks: the operand marks hidden keys
    factor: float = 1.0   # additive masks: the bias is multiplied by it (-1 for a subtraction,
    #                       times the positive scales applied after the bias was added)
    fill: float = float("-inf")  # bool masks: the value hidden scores are replaced by


@dataclass
class Contraction:
    node: Node
    factors: list[Operand]   # tensor factors of the product
    summed: list[int]        # labels summed over
    scale: float             # scalar factors inside the product (and 1/n of a mean)
    interior: list[Node]     # the contraction's own nodes (products, views between them)


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


@dataclass
class IndexerSite:
    """A proven indexer: everything the rewrite needs."""

    name: str
    topk: Node
    space: LabelSpace
    score_dims: Dims                 # labels of the top-k input
    q: Operand
    k: Operand
    weights: list[Operand]
    masks: list[Mask]
    scale: float
    k_top: Any                       # int, or a node computing a SymInt
    batch: Optional[int]             # label of each role (None: absent)
    query: Optional[int]
    head: int
    dim: int
    key: int
    heads: int
    dtype: torch.dtype
    interior: list[Node]
    operands: list[Operand]
    # Run-time Python scalars: (0-d tensor node, "below" or "above" the activation). The rewrite
    # folds them exactly: relu(c*x) = |c|*relu(sign(c)*x), so sign(c) goes into q and |c| (or c,
    # above the activation and after the head sum) into the weights.
    runtime_factors: list[tuple[Node, str]] = field(default_factory=list)

    @property
    def layout(self) -> str:
        """"batch" for q [B,S,H,D] (B may be 1), "flat" for token-major q [N,H,D]."""
        rank = len(self.q.source.dims)
        return "batch" if self.batch is not None or rank >= 4 else "flat"

    @property
    def mask_kind(self) -> str:
        return mask_kind(self.masks)

    @property
    def keys(self):
        return self.space.size(self.key)


@dataclass
class SiteRefusal:
    name: str
    topk: Node
    reason: str
    detail: str
    heads: Optional[int] = None
    k_top: Any = None
    layout: str = ""
    dtype: Optional[torch.dtype] = None
    mask: str = ""


Match = Union[IndexerSite, SiteRefusal]


def mask_kind(masks: list[Mask]) -> str:
    kinds = sorted({m.kind for m in masks})
    return "+".join(kinds) if kinds else "none"


def find_indexer_sites(graph: Union[Graph, GraphModule],
                       python_scalars: Iterable[Node] = ()) -> list[Match]:
    """Every indexer-like top-k of the graph, proven (IndexerSite) or refused (SiteRefusal).

    python_scalars: placeholders known to hold a Python number passed as a 0-d tensor (Dynamo
    does so for float attributes under dynamic shapes). A factor read from one of them has a sign
    known only at run time; it is folded exactly instead of being refused as unknown_scale."""
    graph = graph.graph if isinstance(graph, GraphModule) else graph
    scalars = frozenset(python_scalars)
    found: list[Match] = []
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target == aten.topk.default:
            match = _match_topk(node, scalars)
            if match is not None:
                found.append(match)
    return found


def site_name(node: Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    path = ""
    if stack:
        entry = list(stack.values())[-1]
        path = entry[0] if isinstance(entry, tuple) else str(entry)
        path = re.sub(r"^L\['self'\]\.?|^L\['[^']*'\]\.?", "", path)
        path = re.sub(r"\[(\d+)\]", r".\1", path)
        path = re.sub(r"\._modules\['([^']*)'\]", r".\1", path).strip(".")
    return f"{path}:{node.name}" if path else node.name


def _match_topk(topk: Node, python_scalars: frozenset) -> Optional[Match]:
    matcher = _Matcher(topk, python_scalars)
    try:
        return matcher.match()
    except R.SiteRefused as refusal:
        return matcher.refusal(refusal.reason, refusal.detail)
    except _NotAnIndexer:
        return None
    except Exception as error:  # noqa: BLE001  (an unforeseen graph must never break the compile)
        # One line for the user; the traceback only for whoever debugs the pass.
        logger.warning("misa: could not analyse %s (%s: %s); it is left untouched",
                       topk.name, type(error).__name__, error)
        logger.debug("misa: traceback of the failed analysis of %s", topk.name, exc_info=True)
        return matcher.refusal(R.INTERNAL_ERROR, f"the analysis failed: "
                               f"{type(error).__name__}: {error}")


class _NotAnIndexer(Exception):
    """The top-k does not sit on an indexer (or the search ran out of budget)."""


@dataclass
class _Outer:
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


class _Matcher:
    def __init__(self, topk: Node, python_scalars: frozenset = frozenset()) -> None:
        self.topk = topk
        self.python_scalars = python_scalars
        self.space = LabelSpace()
        self.visits = 0
        self.known: dict[str, Any] = {}
        self.top_label: Optional[int] = None  # the axis top-k runs along

    def refusal(self, reason: str, detail: str) -> SiteRefusal:
        return SiteRefusal(site_name(self.topk), self.topk, reason, detail, **self.known)

    def _visit(self) -> None:
        self.visits += 1
        if self.visits > VISIT_BUDGET:
            raise _NotAnIndexer()

    # --- the top-k ------------------------------------------------------------------------

    def match(self) -> Optional[Match]:
        topk = self.topk
        scores = topk.args[0]
        value = ops.tensor_val(scores)
        if not isinstance(scores, Node) or value is None or value.dim() == 0:
            return None
        k_top = ops.arg(topk, 1, "k")
        dim = ops.arg(topk, 2, "dim", -1)
        self.known.update(k_top=_k_text(k_top), dtype=value.dtype)
        try:
            dims = self.space.fresh_dims(value.shape)
            if isinstance(dim, int) and len(dims[dim % value.dim()]) == 1:
                self.top_label = dims[dim % value.dim()][0]
            outer = self._outer(scores, dims, lookahead=True)
        except LayoutError:
            return None
        if outer is None or not isinstance(dim, int):
            return None
        top_group = self.space.resolve_dims(dims)[dim % value.dim()]
        if len(top_group) != 1:
            return None
        return self._prove(outer, dims, top_group[0], k_top, value.dtype)

    # --- above the head reduction: views, casts, masks, scales ------------------------------

    def _outer(self, node: Any, dims: Dims, lookahead: bool = False) -> Optional[_Outer]:
        """From the top-k input down to the head reduction; None when no indexer lies below."""
        self._visit()
        if not isinstance(node, Node) or node.op != "call_function" \
                or ops.tensor_val(node) is None:
            return None
        target = node.target
        found: Optional[_Outer] = None
        if ops.is_value_preserving(node):
            found = self._outer(node.args[0], ops.input_dims(self.space, node, dims), lookahead)
            # Rounding keeps the order weakly (ties may appear, never swaps), so the exact
            # score's top-k is one of the rounded score's; only what is added after it matters.
            if found is not None and ops.is_rounding_cast(node):
                found.rounded_by = node
        elif target in ops.MULS or target in ops.DIVS or target == aten.neg.default:
            found = self._outer_scale(node, dims, lookahead)
        elif target in ops.ADDS or target in ops.SUBS:
            found = self._outer_add(node, dims)
        elif target in ops.WHERES or target in ops.MASKED_FILLS:
            found = self._outer_fill(node, dims)
        else:
            reduction = self._contraction(node, dims)
            if reduction is not None:
                return self._head_reduction(reduction)
        if found is not None:
            found.interior.append(node)
            return found
        if lookahead:
            self._report_unknown_op(node)
        return None

    def _outer_scale(self, node: Node, dims: Dims, lookahead: bool) -> Optional[_Outer]:
        step = _scalar_step(node)
        if step is not None:
            factor, operand = step
            found = self._outer(operand, _broadcast_dims(dims, operand), lookahead)
            if found is not None:
                issue = _scale_issue(factor, "the index score")
                if issue:
                    found.issues.insert(0, issue)
                else:
                    found.scale *= factor
                    for mask in found.masks:
                        mask.factor *= factor
            return found
        hits = self._score_operands(node, dims, self._outer)
        if len(hits) != 1 or (node.target in ops.DIVS and hits[0][0] is not node.args[0]):
            return None
        found, other = hits[0][1], hits[0][2]
        if node.target in ops.MULS and self._is_python_scalar(other):
            if found.masks:
                # c * masked(score): a negative c turns the hidden keys' -inf into +inf (they
                # win) and c = 0 turns it into NaN, so no fold is exact for every c.
                found.issues.insert(0, (R.UNKNOWN_SCALE, f"{_op(node)} multiplies the masked "
                                        f"index score by {other.name}, a run-time Python "
                                        "number: a negative or zero value would un-hide "
                                        "masked keys"))
            else:
                found.runtime.append(other)
            return found
        found.issues.insert(0, (R.UNKNOWN_SCALE, f"{_op(node)} multiplies the index score by "
                                f"{other.name}, a tensor of unknown sign"))
        return found

    def _outer_add(self, node: Node, dims: Dims) -> Optional[_Outer]:
        """score + bias, or score - bias (a bias with factor -1): an additive mask."""
        hits = self._score_operands(node, dims, self._outer)
        if len(hits) != 1:
            return None
        score, found, other = hits[0]
        alpha = node.kwargs.get("alpha", 1)
        mask_val = ops.tensor_val(other)
        if alpha != 1 or mask_val.dtype not in ops.FLOAT_DTYPES:
            found.issues.insert(0, (R.UNKNOWN_MASK, f"{_op(node)} adds {other.name} "
                                    f"({mask_val.dtype}, alpha={alpha}) to the index score"))
            return found
        if node.target in ops.SUBS and score is node.args[1]:
            found.issues.insert(0, (R.NEGATIVE_SCALE, f"{_op(node)} subtracts the index score "
                                    "from a bias (a factor of -1)"))
            return found
        if found.rounded_by is not None:
            # round(a) + bias_a vs round(b) + bias_b: keys the rounding made equal (or nearly)
            # are ranked by the bias in eager, by the exact score in the ops.
            rounded_dtype = ops.tensor_val(found.rounded_by).dtype
            found.issues.insert(0, (R.ROUNDING_CAST, f"{_op(node)} adds {other.name} after "
                                    f"{_op(found.rounded_by)} rounds the index score to "
                                    f"{rounded_dtype}: the bias can reorder keys the rounding "
                                    "tied"))
            return found
        operand = self._follow(other, _broadcast_dims(dims, other))
        found.masks.append(Mask("additive", operand,
                                factor=-1.0 if node.target in ops.SUBS else 1.0))
        return found

    def _outer_fill(self, node: Node, dims: Dims) -> Optional[_Outer]:
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
        found = self._outer(score, _broadcast_dims(dims, score))
        if found is None:
            return None
        fill = [b for b in branches if b is not score][0]
        fill_value = ops.scalar_value(fill)
        if hidden_when is None:
            hidden_when = score is branches[1]  # where(c, fill, score): c marks hidden keys
        if fill_value is None or not fill_value <= ops.HIDDEN_BIAS:
            shown = "a non-constant tensor" if fill_value is None else f"{fill_value:g}"
            found.issues.insert(0, (R.UNKNOWN_MASK, f"{_op(node)} replaces masked scores by "
                                    f"{shown}, not -inf"))
            return found
        if ops.tensor_val(condition) is None or ops.tensor_val(condition).dtype != torch.bool:
            found.issues.insert(0, (R.UNKNOWN_MASK, f"{_op(node)} has a non-boolean condition"))
            return found
        operand = self._follow(condition, _broadcast_dims(dims, condition), negations=True)
        found.masks.append(Mask("bool", operand, invert=hidden_when, fill=fill_value))
        return found

    def _report_unknown_op(self, node: Node) -> None:
        """An op the pass does not understand right above an indexer: say so, instead of
        silently passing over the site."""
        for source in node.all_input_nodes:
            source_val = ops.tensor_val(source)
            if source_val is None or source_val.dim() == 0:
                continue
            try:
                below = self._outer(source, self.space.fresh_dims(source_val.shape))
            except LayoutError:
                below = None
            if below is not None and below.branch.relu is not None and not below.issues:
                raise R.SiteRefused(R.UNSUPPORTED_LAYOUT, f"{_op(node)} between the head "
                                    "reduction and top-k is not understood")

    # --- the head reduction and the per-head score ------------------------------------------

    def _head_reduction(self, reduction: Contraction) -> Optional[_Outer]:
        hits = []
        for i, (node, dims) in enumerate(reduction.factors):
            branch = self._inner(node, dims, above=True)
            if branch is not None:
                hits.append((i, branch))
        if len(hits) > 1:
            # Weights can be an activation of a contraction too (softmax(x @ Wp)): the score is
            # the branch whose bilinear form reads the top-k axis, then the one with a ReLU.
            ranked = sorted(hits, key=lambda hit: self._score_rank(hit[1]), reverse=True)
            if self._score_rank(ranked[0][1]) == self._score_rank(ranked[1][1]):
                return None
            hits = ranked[:1]
        if not hits:
            return None
        index, branch = hits[0]
        weights = [self._follow(n, d) for i, (n, d) in enumerate(reduction.factors) if i != index]
        found = _Outer(reduction, branch, weights + branch.weights)
        issue = _scale_issue(reduction.scale, "the weighted head sum")
        if issue:
            found.issues.append(issue)
        found.interior.extend(reduction.interior)
        return found

    def _score_rank(self, branch: ScoreBranch) -> tuple[bool, bool, bool]:
        top = set(self.space.resolve(self.top_label)) if self.top_label is not None else set()
        reads_top = any(top & set(self.space.flat(self._follow(n, d).source.dims))
                        for n, d in branch.bilinear.factors)
        return reads_top, branch.relu is not None, not branch.issues

    def _inner(self, node: Any, dims: Dims, above: bool) -> Optional[ScoreBranch]:
        """From a factor of the head reduction down to the bilinear form. `above` is True until
        the activation has been passed."""
        self._visit()
        if not isinstance(node, Node) or node.op != "call_function" \
                or ops.tensor_val(node) is None:
            return None
        target = node.target
        where = "after the activation" if above else "before the activation"
        branch: Optional[ScoreBranch] = None
        if ops.is_value_preserving(node):
            branch = self._inner(node.args[0], ops.input_dims(self.space, node, dims), above)
            if branch is not None and ops.is_rounding_cast(node):
                # Rounded per-head terms summed over heads rank keys differently from the exact
                # terms the ops sum (not a monotone function of the exact score).
                branch.issues.insert(0, (R.ROUNDING_CAST, f"{_op(node)} rounds the per-head "
                                         f"score {where} to {ops.tensor_val(node).dtype} "
                                         "before the head sum"))
        elif ops.relu_input(node) is not None:
            branch = self._inner(ops.relu_input(node), dims, above=False)
            if branch is not None and branch.relu is None:
                branch.relu = node
        elif target in ops.MULS or target in ops.DIVS or target == aten.neg.default:
            step = _scalar_step(node)
            if step is not None:
                factor, operand = step
                branch = self._inner(operand, _broadcast_dims(dims, operand), above)
                if branch is not None:
                    issue = _scale_issue(factor, f"the per-head score {where}")
                    if issue:
                        branch.issues.insert(0, issue)
                    elif above:
                        branch.scale_above *= factor
                    else:
                        branch.scale_below *= factor
            else:
                hits = self._score_operands(node, dims, lambda n, d: self._inner(n, d, above))
                if target in ops.DIVS and hits and hits[0][0] is not node.args[0]:
                    hits = []  # c / score: not a scaled score
                if len(hits) == 2:
                    branch = hits[0][1]
                    branch.issues.insert(0, (R.NOT_RELU, f"{_op(node)} multiplies the score by "
                                             "a function of itself (a gated activation)"))
                elif len(hits) == 1:
                    _, branch, other = hits[0]
                    if target in ops.MULS and self._is_python_scalar(other):
                        (branch.runtime_above if above else branch.runtime_below).append(other)
                    elif above and target in ops.MULS:
                        branch.weights.append(self._follow(other, _broadcast_dims(dims, other)))
                    else:
                        branch.issues.insert(0, (R.UNKNOWN_SCALE, f"{_op(node)} scales the "
                                                 f"score {where} by {other.name}, a tensor of "
                                                 "unknown sign"))
        else:
            bilinear = self._contraction(node, dims)
            if bilinear is not None:
                # No activation between the two contractions: a chain of linear maps, not an
                # indexer.
                if above or len(bilinear.factors) != 2:
                    return None
                branch = ScoreBranch(bilinear, None, interior=list(bilinear.interior))
                issue = _scale_issue(bilinear.scale, "the bilinear form")
                if issue:
                    branch.issues.append(issue)
                else:
                    branch.scale_below *= bilinear.scale
                return branch
            if _is_unary(node):
                branch = self._inner(node.args[0], dims, above=False)
                if branch is not None:
                    branch.issues.insert(0, (R.NOT_RELU, f"{_op(node)} is applied to the "
                                             "per-head score"))
        if branch is not None:
            branch.interior.append(node)
        return branch

    def _score_operands(self, node: Node, dims: Dims, parse) -> list:
        """Tries `parse` on each tensor operand of a binary op: (operand, result, other)."""
        operands = [a for a in node.args[:2] if isinstance(a, Node)
                    and ops.tensor_val(a) is not None]
        if len(operands) != 2 or operands[0] is operands[1]:
            if len(operands) == 2:  # x * x: a square, a function of the score itself
                result = parse(operands[0], _broadcast_dims(dims, operands[0]))
                return [(operands[0], result, operands[1])] * 2 if result is not None else []
            return []
        hits = []
        for i, operand in enumerate(operands):
            try:
                result = parse(operand, _broadcast_dims(dims, operand))
            except LayoutError:
                result = None  # this operand's layout cannot be followed: not the score side
            if result is not None:
                hits.append((operand, result, operands[1 - i]))
        return hits

    # --- contractions ---------------------------------------------------------------------

    def _contraction(self, node: Node, dims: Dims) -> Optional[Contraction]:
        target = node.target
        space = self.space
        if target == aten.bmm.default or target == aten.mm.default:
            a, b = node.args[0], node.args[1]
            summed = space.fresh_dims([ops.shape(a)[-1]])[0]
            if target == aten.bmm.default:
                a_dims = [dims[0], dims[1], summed]
                b_dims = [dims[0], summed, dims[2]]
            else:
                a_dims = [dims[0], summed]
                b_dims = [summed, dims[1]]
            return Contraction(node, [(a, a_dims), (b, b_dims)], list(summed), 1.0, [])
        if target == aten.einsum.default:
            return self._einsum(node, dims)
        if target in ops.SUMS:
            return self._sum_of_product(node, dims)
        return None

    def _einsum(self, node: Node, dims: Dims) -> Optional[Contraction]:
        equation = node.args[0].replace(" ", "")
        operands = list(node.args[1])
        if "..." in equation or "->" not in equation:
            return None
        inputs, output = equation.split("->")
        inputs = inputs.split(",")
        if len(inputs) != len(operands) or len(output) != len(dims) \
                or len(set(output)) != len(output):
            return None
        out_groups = dict(zip(output, dims))
        summed_labels: dict[str, tuple] = {}
        factors = []
        for letters, operand in zip(inputs, operands):
            operand_shape = ops.shape(operand)
            if len(letters) != len(operand_shape) or len(set(letters)) != len(letters):
                return None
            operand_dims = []
            for letter, size in zip(letters, operand_shape):
                if letter in out_groups:
                    operand_dims.append(() if is_unit(size) else out_groups[letter])
                else:
                    if letter not in summed_labels:
                        summed_labels[letter] = self.space.fresh_dims([size])[0]
                    operand_dims.append(() if is_unit(size) else summed_labels[letter])
            factors.append((operand, operand_dims))
        summed = [label for group in summed_labels.values() for label in group]
        return Contraction(node, factors, summed, 1.0, [])

    def _sum_of_product(self, node: Node, dims: Dims) -> Optional[Contraction]:
        source = node.args[0]
        in_shape = ops.shape(source)
        rank = len(in_shape)
        reduce_dims = ops.arg(node, 1, "dim")
        if not reduce_dims or rank == 0:
            return None
        reduced = sorted({d % rank for d in reduce_dims})
        keepdim = ops.arg(node, 2, "keepdim", False)
        in_dims: Dims = []
        remaining = iter(dims)
        for i in range(rank):
            if i in reduced:
                if keepdim:
                    next(remaining)
                in_dims.append(self.space.fresh_dims([in_shape[i]])[0])
            else:
                in_dims.append(next(remaining))
        summed = [label for i in reduced for label in in_dims[i]]
        scale = 1.0
        if node.target == aten.mean.dim:
            count = 1
            for i in reduced:
                size = concrete(in_shape[i])
                if size is None:
                    return None
                count *= size
            scale = 1.0 / count
        product = self._product(source, in_dims)
        if product is None:
            return None
        factors, factor_scale, interior = product
        return Contraction(node, factors, summed, scale * factor_scale, interior)

    def _product(self, node: Node, dims: Dims):
        """Flattens a tree of multiplications (through views and casts) into its tensor factors.
        Constant factors on the way to the first split are the product's own scale; below a split
        they stay inside their factor (a constant times the weights is part of the weights)."""
        stack = [(node, dims, True)]
        factors, interior = [], []
        scale = 1.0
        while stack:
            self._visit()
            current, current_dims, top = stack.pop()
            target = current.target if current.op == "call_function" else None
            step = _scalar_step(current) if target in ops.MULS or target in ops.DIVS \
                or target == aten.neg.default else None
            if target in ops.MULS and step is None:
                interior.append(current)
                for operand in current.args[:2]:
                    stack.append((operand, _broadcast_dims(current_dims, operand), False))
                continue
            if step is not None and top:
                factor, operand = step
                if factor is None:
                    return None
                scale *= factor
                interior.append(current)
                stack.append((operand, _broadcast_dims(current_dims, operand), top))
                continue
            if ops.is_value_preserving(current):
                chain = self._follow(current, current_dims)
                bottom = chain.source.node
                if bottom is not current and bottom.op == "call_function" \
                        and bottom.target in ops.MULS \
                        and (top or _scalar_step(bottom) is None):
                    interior.extend(link.node for link in chain.links[:-1])
                    stack.append((bottom, chain.source.dims, top))
                    continue
            factors.append((current, current_dims))
        return factors, scale, interior

    # --- operands -------------------------------------------------------------------------

    def _is_python_scalar(self, node: Node) -> bool:
        """A 0-d tensor read (through casts and views) from a placeholder holding a Python
        number."""
        value = ops.tensor_val(node)
        if not self.python_scalars or value is None or value.numel() != 1 \
                or value.dtype not in ops.FLOAT_DTYPES:
            return False
        return self._follow(node, [() for _ in value.shape]).source.node in self.python_scalars

    def _follow(self, node: Node, dims: Dims, negations: bool = False) -> Operand:
        links = [Link(node, dims)]
        negated = False
        while True:
            current = links[-1].node
            try:
                if ops.is_value_preserving(current):
                    dims = ops.input_dims(self.space, current, dims)
                elif negations and current.op == "call_function" \
                        and current.target in ops.NEGATIONS \
                        and ops.tensor_val(current.args[0]) is not None \
                        and ops.tensor_val(current.args[0]).dtype == torch.bool:
                    negated = not negated
                else:
                    break
            except LayoutError:
                break
            links.append(Link(current.args[0], dims, negated))
        return Operand(links)

    # --- roles ----------------------------------------------------------------------------

    def _prove(self, outer: _Outer, score_dims: Dims, top: int, k_top: Any,
               dtype: torch.dtype) -> Match:
        space = self.space
        branch = outer.branch
        self.known["mask"] = mask_kind(outer.masks)
        (a, a_dims), (b, b_dims) = branch.bilinear.factors
        fa, fb = self._follow(a, a_dims), self._follow(b, b_dims)
        deps_a, deps_b = fa.depends(space), fb.depends(space)
        heads = [x for label in outer.reduction.summed for x in space.resolve(label)]
        dims_d = [x for label in branch.bilinear.summed for x in space.resolve(label)]
        # Only a top-k over an axis of q or k, summed over an axis of q or k, is an indexer at
        # all; anything else is some other contraction chain and is not reported.
        if top not in deps_a | deps_b or len(heads) != 1 or heads[0] not in deps_a | deps_b:
            raise _NotAnIndexer()
        head = heads[0]
        issues = outer.issues + branch.issues
        if issues:
            raise R.SiteRefused(*issues[0])
        if ops.arg(self.topk, 3, "largest", True) is not True:
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
        self.known["layout"] = "batch" if batch or len(q.source.dims) >= 4 else "flat"
        allowed = set(batch) | set(queries) | {head}
        runtime = [(n, "below") for n in branch.runtime_below] \
            + [(n, "above") for n in branch.runtime_above + outer.runtime]
        for weight in list(outer.weights):
            if self._is_python_scalar(weight.links[0].node):
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
        self.known["heads"] = heads_count
        interior = _unique(outer.interior + branch.interior
                           + [outer.reduction.node, branch.bilinear.node])
        inside = set(interior) | {self.topk}
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
            outputs = ops.getitem_users(self.topk)
        except LayoutError as error:
            raise R.SiteRefused(R.UNSUPPORTED_LAYOUT, str(error)) from None
        finite = [m.fill for m in outer.masks if m.kind == "bool" and m.fill != float("-inf")]
        if outputs.get(0) and finite:
            # The ops report a hidden key's value as -inf; eager reports the model's finite
            # fill, and a row with fewer visible keys than k_top hands it on (a softmax over
            # those values is uniform in eager and NaN after a rewrite).
            raise R.SiteRefused(R.UNKNOWN_MASK, f"the top-k values are used and the mask fills "
                                f"hidden keys with {finite[0]:g}, not -inf; the rewrite would "
                                "report -inf for them")
        if outputs.get(0):
            algebra = MaskAlgebra()
            for mask in outer.masks:
                issue = _finite_hiding_bias(algebra, mask) if mask.kind == "additive" else ""
                if issue:
                    # The same divergence for a bias: the ops hide a key whose bias is at or
                    # below HIDDEN_BIAS and report -inf, eager hands on score + bias.
                    raise R.SiteRefused(R.UNKNOWN_MASK, f"the top-k values are used and {issue};"
                                        " the rewrite would report -inf for those keys")
        scale = branch.scale_below * branch.scale_above * outer.reduction.scale * outer.scale
        operands = [q, k] + outer.weights + [m.operand for m in outer.masks]
        return IndexerSite(
            name=site_name(self.topk), topk=self.topk, space=space, score_dims=score_dims,
            q=q, k=k, weights=outer.weights, masks=outer.masks, scale=scale, k_top=k_top,
            batch=batch[0] if batch else None, query=queries[0] if queries else None,
            head=head, dim=dim, key=top, heads=heads_count, dtype=dtype, interior=interior,
            operands=operands, runtime_factors=runtime)


# --- small helpers --------------------------------------------------------------------------

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
    return (f"the additive bias {node.name} is not proven to hide keys only with -inf (an entry "
            f"at or below {ops.HIDDEN_BIAS:g} hides its key)")


def _scalar_step(node: Node) -> Optional[tuple[Optional[float], Node]]:
    """For x*c, c*x, x/c and -x with a constant c: (factor, x). The factor is None when c is
    a number whose value is unknown at compile time (a symbolic scalar or 0-d input). Returns None
    when both operands are tensors of unknown value."""
    target = node.target
    if target == aten.neg.default:
        return -1.0, node.args[0]
    if target in ops.DIVS:
        if node.kwargs.get("rounding_mode") is not None or len(node.args) > 2:
            return None
        x, c = node.args[0], node.args[1]
        if not (isinstance(x, Node) and ops.tensor_val(x) is not None):
            return None
        value = ops.scalar_value(c)
        if value is None:
            return (None, x) if not _is_tensor_node(c) or ops.tensor_val(c).dim() == 0 \
                else None
        return (1.0 / value if value != 0 else None), x
    a, b = node.args[0], node.args[1]
    a_tensor, b_tensor = _is_tensor_node(a), _is_tensor_node(b)
    if a_tensor and not b_tensor:
        return ops.scalar_value(b), a
    if b_tensor and not a_tensor:
        return ops.scalar_value(a), b
    if not (a_tensor and b_tensor):
        return None
    a_value, b_value = ops.scalar_value(a), ops.scalar_value(b)
    if b_value is not None:
        return b_value, a
    if a_value is not None:
        return a_value, b
    return None


def _scale_issue(factor: Optional[float], what: str) -> Optional[tuple[str, str]]:
    if factor is None:
        return R.UNKNOWN_SCALE, f"{what} is scaled by a factor whose sign is unknown"
    if factor != factor:
        return R.UNKNOWN_SCALE, f"{what} is scaled by NaN"
    if factor <= 0:
        return R.NEGATIVE_SCALE, f"{what} is scaled by {factor:g}"
    return None


def _is_tensor_node(x: Any) -> bool:
    return isinstance(x, Node) and ops.tensor_val(x) is not None


def _broadcast_dims(dims: Dims, operand: Node) -> Dims:
    return LabelSpace.through_broadcast(dims, ops.shape(operand))


def _is_unary(node: Node) -> bool:
    """An elementwise function of one tensor (an activation other than ReLU, a power, ...)."""
    inputs = [a for a in node.all_input_nodes if ops.tensor_val(a) is not None]
    if len(inputs) != 1 or node.args[0] is not inputs[0]:
        return False
    return tuple(ops.shape(inputs[0])) == tuple(ops.shape(node))


def _unique(nodes: list[Node]) -> list[Node]:
    return list(dict.fromkeys(nodes))


def _op(node: Node) -> str:
    """`aten.exp (exp_1)`: the op and the node, for refusal details."""
    schema = getattr(node.target, "_schema", None)
    name = schema.name.replace("::", ".") if schema is not None \
        else getattr(node.target, "__name__", str(node.target))
    return f"{name} ({node.name})"


def _k_text(k_top: Any) -> Any:
    if isinstance(k_top, int):
        return k_top
    return str(ops.val(k_top)) if isinstance(k_top, Node) else str(k_top)
