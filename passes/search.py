"""The state of the search below one top-k, shared by the modules that parse its pieces: the axis
labels (axis_labels.LabelSpace), the visit budget, the placeholders holding run-time Python
numbers, what is known for the report so far, and the walks every piece uses: following an
operand through value-preserving ops to its source, and trying a parse on each operand of a
binary op."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch.fx import Node

from . import aten_ops as ops
from .axis_labels import Dims, LabelSpace, LayoutError
from .indexer_site import Link, Operand

# Nodes the matcher may look at per top-k: enough for any indexer spelling, small enough that a
# top-k deep inside unrelated code gives up quickly.
VISIT_BUDGET = 600


class NotAnIndexer(Exception):
    """The top-k does not sit on an indexer (or the search ran out of budget)."""


class TopkSearch:
    def __init__(self, topk: Node, python_scalars: frozenset = frozenset()) -> None:
        self.topk = topk
        self.python_scalars = python_scalars
        self.space = LabelSpace()
        self.visits = 0
        self.known: dict[str, Any] = {}  # SiteRefusal fields learnt so far (heads, k_top, ...)
        self.top_label: Optional[int] = None  # the axis top-k runs along

    def visit(self) -> None:
        self.visits += 1
        if self.visits > VISIT_BUDGET:
            raise NotAnIndexer()

    def is_python_scalar(self, node: Node) -> bool:
        """A 0-d tensor read (through casts and views) from a placeholder holding a Python
        number."""
        value = ops.tensor_val(node)
        if not self.python_scalars or value is None or value.numel() != 1 \
                or value.dtype not in ops.FLOAT_DTYPES:
            return False
        return self.follow(node, [() for _ in value.shape]).source.node in self.python_scalars

    def follow(self, node: Node, dims: Dims, negations: bool = False) -> Operand:
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

    def score_operands(self, node: Node, dims: Dims, parse) -> list:
        """Tries `parse` on each tensor operand of a binary op: (operand, result, other)."""
        operands = [a for a in node.args[:2] if isinstance(a, Node)
                    and ops.tensor_val(a) is not None]
        if len(operands) != 2 or operands[0] is operands[1]:
            if len(operands) == 2:  # x * x: a square, a function of the score itself
                result = parse(operands[0], broadcast_dims(dims, operands[0]))
                return [(operands[0], result, operands[1])] * 2 if result is not None else []
            return []
        hits = []
        for i, operand in enumerate(operands):
            try:
                result = parse(operand, broadcast_dims(dims, operand))
            except LayoutError:
                result = None  # this operand's layout cannot be followed: not the score side
            if result is not None:
                hits.append((operand, result, operands[1 - i]))
        return hits


def broadcast_dims(dims: Dims, operand: Node) -> Dims:
    return LabelSpace.through_broadcast(dims, ops.shape(operand))


def describe(node: Node) -> str:
    """`aten.exp (exp_1)`: the op and the node, for refusal details."""
    schema = getattr(node.target, "_schema", None)
    name = schema.name.replace("::", ".") if schema is not None \
        else getattr(node.target, "__name__", str(node.target))
    return f"{name} ({node.name})"
