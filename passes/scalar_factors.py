"""Constant factors on the index score: which operand of a multiplication, division or negation is
a number, its value if known at compile time, and whether it keeps the selection (a positive
factor) or changes it (negative, zero, NaN, or of unknown sign)."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch.fx import Node

from . import aten_ops as ops
from . import reasons as R

aten = torch.ops.aten


def scalar_step(node: Node) -> Optional[tuple[Optional[float], Node]]:
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
            return (None, x) if not is_tensor_node(c) or ops.tensor_val(c).dim() == 0 \
                else None
        return (1.0 / value if value != 0 else None), x
    a, b = node.args[0], node.args[1]
    a_tensor, b_tensor = is_tensor_node(a), is_tensor_node(b)
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


def scale_issue(factor: Optional[float], what: str) -> Optional[tuple[str, str]]:
    if factor is None:
        return R.UNKNOWN_SCALE, f"{what} is scaled by a factor whose sign is unknown"
    if factor != factor:
        return R.UNKNOWN_SCALE, f"{what} is scaled by NaN"
    if factor <= 0:
        return R.NEGATIVE_SCALE, f"{what} is scaled by {factor:g}"
    return None


def is_tensor_node(x: Any) -> bool:
    return isinstance(x, Node) and ops.tensor_val(x) is not None
