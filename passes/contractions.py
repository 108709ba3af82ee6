"""Contractions: a bmm/mm, a 2-operand einsum, or a sum/mean over a product (through views and
casts), parsed into their tensor factors with axis labels, the labels summed over, and the
constant factors inside the product. Both contractions of an indexer (q.k over D, and the
weighted sum over heads) are read with this."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.fx import Node

from . import aten_ops as ops
from .axis_labels import Dims, concrete, is_unit
from .scalar_factors import scalar_step
from .search import TopkSearch, broadcast_dims

aten = torch.ops.aten



@dataclass
class Contraction:
    node: Node
    factors: list[tuple[Node, Dims]]  # tensor factors of the product, with their labels
    summed: list[int]        # labels summed over
    scale: float             # scalar factors inside the product (and 1/n of a mean)
    interior: list[Node]     # the contraction's own nodes (products, views between them)



def parse_contraction(search: TopkSearch, node: Node, dims: Dims) -> Optional[Contraction]:
    target = node.target
    space = search.space
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
        return _einsum(search, node, dims)
    if target in ops.SUMS:
        return _sum_of_product(search, node, dims)
    return None


def _einsum(search: TopkSearch, node: Node, dims: Dims) -> Optional[Contraction]:
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
                    summed_labels[letter] = search.space.fresh_dims([size])[0]
                operand_dims.append(() if is_unit(size) else summed_labels[letter])
        factors.append((operand, operand_dims))
    summed = [label for group in summed_labels.values() for label in group]
    return Contraction(node, factors, summed, 1.0, [])


def _sum_of_product(search: TopkSearch, node: Node, dims: Dims) -> Optional[Contraction]:
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
            in_dims.append(search.space.fresh_dims([in_shape[i]])[0])
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
    product = _product(search, source, in_dims)
    if product is None:
        return None
    factors, factor_scale, interior = product
    return Contraction(node, factors, summed, scale * factor_scale, interior)


def _product(search: TopkSearch, node: Node, dims: Dims):
    """Flattens a tree of multiplications (through views and casts) into its tensor factors.
    Constant factors on the way to the first split are the product's own scale; below a split
    they stay inside their factor (a constant times the weights is part of the weights)."""
    stack = [(node, dims, True)]
    factors, interior = [], []
    scale = 1.0
    while stack:
        search.visit()
        current, current_dims, top = stack.pop()
        target = current.target if current.op == "call_function" else None
        step = scalar_step(current) if target in ops.MULS or target in ops.DIVS \
            or target == aten.neg.default else None
        if target in ops.MULS and step is None:
            interior.append(current)
            for operand in current.args[:2]:
                stack.append((operand, broadcast_dims(current_dims, operand), False))
            continue
        if step is not None and top:
            factor, operand = step
            if factor is None:
                return None
            scale *= factor
            interior.append(current)
            stack.append((operand, broadcast_dims(current_dims, operand), top))
            continue
        if ops.is_value_preserving(current):
            chain = search.follow(current, current_dims)
            bottom = chain.source.node
            if bottom is not current and bottom.op == "call_function" \
                    and bottom.target in ops.MULS \
                    and (top or scalar_step(bottom) is None):
                interior.extend(link.node for link in chain.links[:-1])
                stack.append((bottom, chain.source.dims, top))
                continue
        factors.append((current, current_dims))
    return factors, scale, interior
