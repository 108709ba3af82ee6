"""Axis labels: which logical axis each dimension of a tensor in an ATen graph stands for.

The matcher starts at the top-k input, gives each of its dimensions a fresh label, and walks down
the graph. Every view-like op maps its output's labels onto its input's dimensions: a reshape
groups labels (a merged dimension is a row-major tuple of labels) or splits one label into finer
ones, a permute reorders them, an expand or a broadcasting operand drops the labels it does not
vary along. A contraction (bmm, mm, einsum, sum of a product) creates a label for the axis it sums.
At the end, the labels a source tensor carries say exactly which axes it depends on, whatever
chain of unsqueeze/permute/view/expand produced the operand.

Dims are a list with one tuple of labels per tensor dimension; () marks a size-1 dimension (or one
that a broadcast ignores). Sizes may be ints or SymInts; equalities are only accepted when they
are statically known, so a proof never rests on a guess about a symbolic size."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

Size = Union[int, torch.SymInt]
Dims = list  # list[tuple[int, ...]]


class LayoutError(Exception):
    """The labels cannot be mapped through an op (e.g. a reshape that mixes axes)."""


def same_size(a: Size, b: Size) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return statically_known_true(a == b)


def is_unit(size: Size) -> bool:
    return same_size(size, 1)


def size_hint(size: Size) -> int:
    """A concrete example value of a size, only used to decide which side of a reshape to extend
    next; the result is always checked with same_size."""
    if isinstance(size, int):
        return size
    hint = size.node.hint
    if hint is None:
        raise LayoutError(f"size {size} has no example value")
    return int(hint)


def concrete(size: Size) -> Optional[int]:
    if isinstance(size, int):
        return size
    value = size.node.maybe_as_int()
    return None if value is None else int(value)


class LabelSpace:
    """Creates labels, remembers their sizes and how labels were split into finer ones."""

    def __init__(self) -> None:
        self._sizes: dict[int, Size] = {}
        self._parts: dict[int, tuple[int, ...]] = {}

    def new(self, size: Size) -> int:
        label = len(self._sizes)
        self._sizes[label] = size
        return label

    def size(self, label: int) -> Size:
        return self._sizes[label]

    def resolve(self, label: int) -> tuple[int, ...]:
        """The finest labels that `label` was split into (itself when never split)."""
        parts = self._parts.get(label)
        if parts is None:
            return (label,)
        return tuple(p for part in parts for p in self.resolve(part))

    def resolve_dims(self, dims: Dims) -> Dims:
        return [tuple(p for label in group for p in self.resolve(label)) for group in dims]

    def flat(self, dims: Dims) -> list[int]:
        return [label for group in self.resolve_dims(dims) for label in group]

    def fresh_dims(self, shape: Sequence[Size]) -> Dims:
        return [() if is_unit(n) else (self.new(n),) for n in shape]

    def split(self, label: int, sizes: Sequence[Size]) -> tuple[int, ...]:
        parts = tuple(self.new(n) for n in sizes)
        self._parts[label] = parts
        return parts

    def group_size(self, group: Sequence[int]) -> Size:
        total: Size = 1
        for label in group:
            total = total * self.size(label)
        return total

    # --- mapping an op's output labels onto its input's dimensions ---------------------------

    def through_reshape(self, out_dims: Dims, in_shape: Sequence[Size]) -> Dims:
        """Labels of the input of a reshape (view, unsqueeze, squeeze, ...) whose output has
        `out_dims`. Row-major reshapes only group or split axes; anything else raises."""
        upper = self.flat(out_dims)
        lower = [i for i, n in enumerate(in_shape) if not is_unit(n)]
        in_dims: Dims = [() for _ in in_shape]
        u = v = 0
        while u < len(upper) or v < len(lower):
            if u >= len(upper) or v >= len(lower):
                raise LayoutError("reshape changes the number of elements")
            ups, lows = [upper[u]], [lower[v]]
            u, v = u + 1, v + 1
            up_size = self.size(ups[0])
            low_size = in_shape[lows[0]]
            while not same_size(up_size, low_size):
                if size_hint(up_size) < size_hint(low_size) and u < len(upper):
                    ups.append(upper[u])
                    up_size = up_size * self.size(upper[u])
                    u += 1
                elif size_hint(up_size) > size_hint(low_size) and v < len(lower):
                    lows.append(lower[v])
                    low_size = low_size * in_shape[lower[v]]
                    v += 1
                else:
                    raise LayoutError("reshape mixes axes")
            if len(lows) == 1:
                in_dims[lows[0]] = tuple(ups)
            elif len(ups) == 1:
                for dim, part in zip(lows, self.split(ups[0], [in_shape[i] for i in lows])):
                    in_dims[dim] = (part,)
            else:
                raise LayoutError("reshape regroups several axes at once")
        return in_dims

    @staticmethod
    def through_permute(out_dims: Dims, perm: Sequence[int]) -> Dims:
        rank = len(out_dims)
        in_dims: Dims = [() for _ in range(rank)]
        for out_pos, in_pos in enumerate(perm):
            in_dims[in_pos % rank] = out_dims[out_pos]
        return in_dims

    @staticmethod
    def through_broadcast(out_dims: Dims, in_shape: Sequence[Size]) -> Dims:
        """Labels of an operand broadcast (right-aligned) to the output: a size-1 operand
        dimension does not vary along the output's labels there, so it gets ()."""
        offset = len(out_dims) - len(in_shape)
        if offset < 0:
            raise LayoutError("operand has more dimensions than the result")
        return [() if is_unit(n) else out_dims[offset + i] for i, n in enumerate(in_shape)]
