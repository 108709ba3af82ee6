"""What a mask built inside an ATen graph computes, proven from the ops that build it.

Models build their attention masks from positions: `arange`/`iota`, offsets, views, `index` with
position tensors, comparisons, `&`, `~`, `tril`/`triu`, and `where(visible, 0, min)` or
`masked_fill` to make an additive bias. This module evaluates such a subgraph abstractly, in the
coordinates (element indices) of each node's own output:

  Affine     an integer tensor whose element at index i is  const + sum_d coefs[d] * i[d]
             (positions: arange(past, past + S), cache positions, key positions, ...)
  ReadSum    an integer tensor  Affine(i) + sum_k coef_k * node_k[at_k(i)]: integer graph nodes
             whose values are unknown (position_ids passed in, labels cumsum'd from them) read
             at affine coordinates, e.g. P[b, q] - P[b, kv]
  Predicate  a bool tensor: True exactly where every Bound and ReadBound holds and every Leaf is
             True
  Bias       a float tensor: 0 where a Predicate holds, a value <= HIDDEN_BIAS elsewhere
  FloatConst a float tensor with one value everywhere

Anything it cannot prove is opaque: a bool node it does not understand becomes a Leaf (a graph
node kept as it is, with the coordinates it runs along), an integer node a Read of itself, a float
node unknown (None).

Two facts about opaque integer nodes are proven on demand: `nondecreasing` (a cumsum of a bool, so
equal labels L[q] == L[kv] form one contiguous run) and `segment_labels` (the cumsum of
`diff(P) != 1`, transformers' packed-sequence labels: within one run P[x] - P[y] == x - y), which
`within_segments` uses to turn position bounds into index bounds.

Sizes and offsets may be ints or SymInts; an equality between them is accepted only when it is
statically known (axis_labels.same_size), never guessed from example values."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence, Union

import torch
from torch.fx import Node

from . import aten_ops as ops
from .axis_labels import LayoutError, Size, concrete, is_unit, same_size

aten = torch.ops.aten
prims = torch.ops.prims

INT_DTYPES = (torch.int64, torch.int32)


@dataclass(frozen=True)
class Affine:
    """const + sum_d coefs[d] * index[d]; coefs has one entry per dimension (0 on size-1 ones)."""

    const: Size
    coefs: tuple

    def shifted(self, amount: Size) -> "Affine":
        return Affine(self.const + amount, self.coefs)

    def scaled(self, factor: Size) -> "Affine":
        return Affine(self.const * factor, tuple(c * factor for c in self.coefs))

    def plus(self, other: "Affine") -> "Affine":
        return Affine(self.const + other.const,
                      tuple(a + b for a, b in zip(self.coefs, other.coefs)))

    @property
    def is_constant(self) -> bool:
        return all(same_size(c, 0) for c in self.coefs)


@dataclass(frozen=True)
class Leaf:
    """A bool graph node kept as it is. dims[j] is the coordinate (dimension of the tensor being
    described) that the node's dimension j runs along, None where the node has size 1.
    `negated`: the value is the node's logical not."""

    node: Node
    dims: tuple
    negated: bool = False


@dataclass(frozen=True)
class Bound:
    """The condition  const + sum_d coefs[d] * index[d] >= 0  over integer indices. `leaf`: a graph
    node computing exactly this condition, if one exists (needed to keep it as a mask)."""

    expr: Affine
    leaf: Optional[Leaf]

    def negated(self, leaf: Optional[Leaf]) -> "Bound":
        # not (e >= 0)  <=>  -e - 1 >= 0 over the integers.
        return Bound(self.expr.scaled(-1).shifted(-1), leaf)


@dataclass(frozen=True)
class Read:
    """node[at(i)]: an integer graph node of unknown values read at affine coordinates; `at` has
    one Affine (in the described tensor's coordinates) per dimension of the node."""

    node: Node
    at: tuple


@dataclass(frozen=True)
class ReadSum:
    """base(i) + sum_k coef_k * read_k(i); `terms` holds (coef, Read) pairs, no Read twice and no
    zero coef. With no terms it is an Affine, and is always spelled as one (_normal)."""

    base: Affine
    terms: tuple

    def scaled(self, factor: Size) -> "ReadSum":
        return ReadSum(self.base.scaled(factor), tuple((c * factor, r) for c, r in self.terms))

    def shifted(self, amount: Size) -> "ReadSum":
        return ReadSum(self.base.shifted(amount), self.terms)


@dataclass(frozen=True)
class ReadBound:
    """The condition  expr >= 0  with expr a ReadSum; `leaf`: a node computing exactly it."""

    expr: ReadSum
    leaf: Optional[Leaf]

    def negated(self, leaf: Optional[Leaf]) -> "ReadBound":
        return ReadBound(self.expr.scaled(-1).shifted(-1), leaf)


@dataclass(frozen=True)
class Labels:
    """A node proven to hold transformers' packed-sequence labels along `dim`: for every index i
    with i[dim] >= 1, labels[i] - labels[i - e_dim] is (P[at(i)] - P[at(i) - e] != 1), where
    `positions` = P read at `at`, and at(i - e_dim) = at(i) - e (one P dimension steps with dim).
    So on a run of equal labels P[at(x)] - P[at(y)] == x[dim] - y[dim]."""

    positions: Read
    dim: int


@dataclass(frozen=True)
class Predicate:
    """True exactly where every bound and read bound holds and every leaf is True; `never`: False
    everywhere."""

    bounds: tuple = ()
    leaves: tuple = ()
    never: bool = False
    read_bounds: tuple = ()

    @property
    def always(self) -> bool:
        return not self.never and not self.bounds and not self.leaves and not self.read_bounds

    @property
    def parts(self) -> int:
        return len(self.bounds) + len(self.leaves) + len(self.read_bounds)

    def both(self, other: "Predicate") -> "Predicate":
        if self.never or other.never:
            return Predicate(never=True)
        return Predicate(self.bounds + other.bounds, self.leaves + other.leaves,
                         read_bounds=self.read_bounds + other.read_bounds)


@dataclass(frozen=True)
class Bias:
    """0 where `visible` holds, a value <= `hidden` (itself <= HIDDEN_BIAS) elsewhere."""

    visible: Predicate
    hidden: float


@dataclass(frozen=True)
class FloatConst:
    value: float


Value = Union[Affine, ReadSum, Predicate, Bias, FloatConst]

# How the coordinates of an op's input are read from its output's: one Affine (in output
# coordinates) per input dimension.
IndexMap = tuple


class MaskAlgebra:
    """Evaluates nodes of one graph; results are memoised per node."""

    def __init__(self) -> None:
        self._memo: dict[Node, Optional[Value]] = {}

    def value(self, node: Any) -> Optional[Value]:
        if not isinstance(node, Node):
            return _python_constant(node)
        if node not in self._memo:
            self._memo[node] = None  # cycles are impossible in an FX graph; this guards depth
            self._memo[node] = self._evaluate(node)
        return self._memo[node]

    # --- dispatch ---------------------------------------------------------------------------

    def _evaluate(self, node: Node) -> Optional[Value]:
        value = ops.tensor_val(node)
        if value is None:
            return None
        try:
            result = self._evaluate_op(node, value) if node.op == "call_function" else None
        except (LayoutError, TypeError, ValueError, IndexError, KeyError, AttributeError):
            result = None  # an op spelled in a way this module does not read: opaque
        result = _checked_kind(result, value.dtype)
        if result is None and value.dtype == torch.bool:
            return Predicate(leaves=(Leaf(node, _own_dims(value.shape)),))
        if result is None and value.dtype in INT_DTYPES:
            # Values unknown, but two reads of it can still be compared (P[kv] <= P[q]).
            rank = value.dim()
            own = tuple(Affine(0, (0,) * rank) if is_unit(n) else _coordinate(d, rank)
                        for d, n in enumerate(value.shape))
            return ReadSum(Affine(0, (0,) * rank), ((1, Read(node, own)),))
        return result

    # --- proven facts about opaque integer nodes --------------------------------------------

    def nondecreasing(self, node: Node) -> Optional[int]:
        """The dimension along which `node` is a cumsum of a bool (of 0s and 1s), hence
        nondecreasing; None if that is not proven."""
        if not isinstance(node, Node) or node.target != aten.cumsum.default:
            return None
        source, value = node.args[0], ops.tensor_val(node)
        if value is None or value.dtype not in INT_DTYPES or "dtype" in node.kwargs:
            return None
        if isinstance(source, Node) and source.target in ops.CASTS \
                and _dtype(source) in INT_DTYPES:
            source = source.args[0]  # (d != 1).long().cumsum(-1): 0/1 as well
        if _dtype(source) != torch.bool:
            return None
        return node.args[1] % value.dim()

    def segment_labels(self, node: Node) -> Optional[Labels]:
        """`node` as the packed-sequence labels of some P (see Labels): cumsum along dim of
        (D != 1) where, at every index past the first along dim, D = P[at] - P[at - e]. The value
        of D at index 0 only adds a constant to every label, so it does not matter."""
        dim = self.nondecreasing(node)
        if dim is None:
            return None
        source = node.args[0]
        if source.target in ops.CASTS and _dtype(source) in INT_DTYPES:
            source = source.args[0]
        try:
            not_one = self._not_one(source, dim)
        except (LayoutError, TypeError, ValueError, IndexError, KeyError, AttributeError):
            return None  # spelled in a way this module does not read
        return _as_labels(not_one, dim, ops.shape(node)) if not_one is not None else None

    def within_segments(self, predicate: Predicate, shape: Sequence[Size]) -> Predicate:
        """`predicate` (describing a tensor of `shape`) with every position bound
        P[at(c1)] - P[at(c2)] + k >= 0 that stands next to the same-segment condition
        L[c1] == L[c2] (both halves, L proven the labels of that P, c1 and c2 equal but along the
        labels' dim) replaced by the index bound c1[dim] - c2[dim] + k >= 0: on one segment the
        two are equal (Labels), and off it the conjunction is False either way."""
        if predicate.never or not predicate.read_bounds:
            return predicate
        differences = [label_difference(b.expr) for b in predicate.read_bounds]
        pairs = [d for d in differences if d is not None
                 and any(o is not None and o[0] is d[0] and _same_at(o[1], d[2])
                         and _same_at(o[2], d[1]) for o in differences)]
        bounds, kept = list(predicate.bounds), []
        for bound in predicate.read_bounds:
            index = self._position_bound(bound.expr, pairs, shape)
            if index is None:
                kept.append(bound)
            else:
                bounds.append(Bound(index, bound.leaf))
        return Predicate(tuple(bounds), predicate.leaves, read_bounds=tuple(kept))

    def _position_bound(self, expr: ReadSum, pairs: list, shape: Sequence[Size]
                        ) -> Optional[Affine]:
        """c1[dim] - c2[dim] + k for expr = P[at(c1)] - P[at(c2)] + k with (L, c1, c2) one of the
        same-segment pairs and L the labels of P; None if no pair proves it."""
        if not expr.base.is_constant or len(expr.terms) != 2:
            return None
        plus = [r for c, r in expr.terms if same_size(c, 1)]
        minus = [r for c, r in expr.terms if same_size(c, -1)]
        if len(plus) != 1 or len(minus) != 1 or plus[0].node is not minus[0].node:
            return None
        for node, c1, c2 in pairs:
            labels = self.segment_labels(node)
            if labels is None or labels.positions.node is not plus[0].node:
                continue
            dim = labels.dim
            if not all(_same_at((x,), (y,)) for d, (x, y) in enumerate(zip(c1, c2)) if d != dim):
                continue  # another row (batch) of the labels: not one segment
            at = labels.positions.at
            if _same_at(plus[0].at, tuple(_compose(x, c1, shape) for x in at)) and \
                    _same_at(minus[0].at, tuple(_compose(x, c2, shape) for x in at)):
                return c1[dim].plus(c2[dim].scaled(-1)).shifted(expr.base.const)
        return None

    def _not_one(self, node: Node, dim: int) -> Optional[ReadSum]:
        """E such that node == (E != 0) wherever the index along dim is >= 1, for node spelled
        ne(a, b) or not(eq(a, b)); E = a - b read over that range."""
        negated = node.target in ops.NEGATIONS
        inner = node.args[0] if negated else node
        if not isinstance(inner, Node):
            return None
        wanted = _EQ if negated else _NE
        if inner.target not in wanted:
            return None
        a, b = (self._tail(x, dim, 1, ops.shape(inner)) for x in inner.args[:2])
        difference = _sum_plus(a, b, -1)
        return difference if isinstance(difference, ReadSum) else None

    def _tail(self, operand: Any, dim: int, start: int, shape: tuple) -> Optional[Value]:
        """The value of `operand` broadcast to `shape`, valid only where the index along `dim` is
        >= start: it sees through a cat whose last piece holds that whole range and through
        slices and sums along `dim`, which the value everywhere (self.value) cannot."""
        if not isinstance(operand, Node) or ops.tensor_val(operand) is None:
            return self._broadcast(operand, shape)
        in_shape = ops.shape(operand)
        offset = len(shape) - len(in_shape)
        local = dim - offset
        if local < 0 or is_unit(in_shape[local]):
            return self._broadcast(operand, shape)  # constant along dim: valid everywhere
        value = self._tail_own(operand, local, start, tuple(in_shape))
        return _apply_map(value, _broadcast_map(in_shape, shape), in_shape, shape)

    def _tail_own(self, node: Node, dim: int, start: int, shape: tuple) -> Optional[Value]:
        target = node.target
        if target == aten.slice.Tensor and ops.arg(node, 1, "dim", 0) % len(shape) == dim:
            begin = ops.arg(node, 2, "start", None) or 0
            if not isinstance(begin, int) or begin < 0 or ops.arg(node, 4, "step", 1) != 1:
                return None
            source = node.args[0]
            inner = self._tail_own(source, dim, start + begin, tuple(ops.shape(source)))
            return _apply_map(inner, _shift_map(len(shape), dim, begin), ops.shape(source), shape)
        if target == aten.cat.default and ops.arg(node, 1, "dim", 0) % len(shape) == dim:
            last = node.args[0][-1]
            begin = sum(concrete(ops.shape(p)[dim]) for p in node.args[0][:-1])
            if begin > start:
                return None
            inner = self._tail_own(last, dim, start - begin, tuple(ops.shape(last)))
            return _apply_map(inner, _shift_map(len(shape), dim, -begin), ops.shape(last), shape)
        if target in ops.ADDS or target in ops.SUBS or target in (aten.add.Scalar,
                                                                   aten.sub.Scalar):
            if node.kwargs.get("alpha", 1) != 1:
                return None
            a, b = (self._tail(x, dim, start, shape) for x in node.args[:2])
            subtract = target in ops.SUBS or target == aten.sub.Scalar
            return _sum_plus(a, b, -1 if subtract else 1)
        value = self.value(node)  # valid everywhere, so on the tail too
        return value if isinstance(value, (Affine, ReadSum)) else None

    def _evaluate_op(self, node: Node, value: torch.Tensor) -> Optional[Value]:
        target = node.target
        shape = tuple(value.shape)
        if target in _CONSTANT_BUILDERS:
            return _constant(node, value)
        if target in (aten.arange.default, aten.arange.start, aten.arange.start_step,
                      prims.iota.default):
            return _arange(node, value)
        index_map = _view_map(node, shape)
        if index_map is not None:
            return self._mapped(node.args[0], index_map, shape)
        if target in ops.CASTS:
            return self._cast(node, value)
        if target in ops.ADDS or target in ops.SUBS or target in (aten.add.Scalar,
                                                                   aten.sub.Scalar):
            return self._add(node, shape, subtract=target in ops.SUBS or target == aten.sub.Scalar)
        if target in ops.MULS:
            return self._mul(node, shape)
        if target == aten.neg.default:
            operand = self._broadcast(node.args[0], shape)
            return operand.scaled(-1) if isinstance(operand, (Affine, ReadSum)) else None
        if target in _COMPARISONS:
            return self._compare(node, shape)
        if target in (aten.bitwise_and.Tensor, aten.logical_and.default):
            a, b = (self._broadcast(x, shape) for x in node.args[:2])
            if isinstance(a, Predicate) and isinstance(b, Predicate):
                return a.both(b)
            return None
        if target in (aten.bitwise_or.Tensor, aten.logical_or.default):
            a, b = (self._broadcast(x, shape) for x in node.args[:2])
            for one, other in ((a, b), (b, a)):
                if isinstance(one, Predicate) and one.always:
                    return one
                if isinstance(one, Predicate) and one.never:
                    return other if isinstance(other, Predicate) else None
            return None
        if target in ops.NEGATIONS:
            operand = self.value(node.args[0])
            return negate(operand, Leaf(node, _own_dims(shape))) \
                if isinstance(operand, Predicate) else None
        if target in (aten.tril.default, aten.triu.default):
            return self._triangle(node, shape)
        if target in ops.WHERES:
            return self._where(node, shape)
        if target in ops.MASKED_FILLS:
            return self._masked_fill(node, shape)
        if target == aten.cumsum.default:
            return self._cumsum(node, shape)
        if target == aten.cat.default:
            return self._cat(node, shape)
        if target == aten.index.Tensor:
            return self._index(node, shape)
        return None

    # --- coordinates ------------------------------------------------------------------------

    def _mapped(self, source: Any, index_map: IndexMap, shape: tuple) -> Optional[Value]:
        """The value of `source` read at the input coordinates index_map gives for each output
        coordinate."""
        value = self.value(source)
        in_shape = ops.shape(source) if isinstance(source, Node) else ()
        return _apply_map(value, index_map, in_shape, shape)

    def _broadcast(self, operand: Any, shape: tuple) -> Optional[Value]:
        if isinstance(operand, Node) and ops.tensor_val(operand) is None:
            operand = ops.val(operand)  # a symbolic int computed in the graph (sym_size, ...)
        if not isinstance(operand, Node):
            return _python_constant(operand, rank=len(shape))
        in_shape = ops.shape(operand)
        return self._mapped(operand, _broadcast_map(in_shape, shape), shape)

    # --- integer arithmetic -----------------------------------------------------------------

    def _cast(self, node: Node, value: torch.Tensor) -> Optional[Value]:
        source = self.value(node.args[0])
        src_val = ops.tensor_val(node.args[0])
        if src_val is None or src_val.device != value.device:
            return None
        src, dst = src_val.dtype, value.dtype
        if src == dst or (src in INT_DTYPES and dst in INT_DTYPES
                          and not isinstance(source, ReadSum)):
            return source
        if src == torch.int32 and dst == torch.int64:
            return source  # unknown values: only a cast that cannot wrap keeps them
        if src in ops.FLOAT_DTYPES and dst in ops.FLOAT_DTYPES:
            # Rounding keeps 0 at 0 and keeps a value <= HIDDEN_BIAS at or below it (HIDDEN_BIAS
            # is float16's lowest finite value, representable in every float type).
            return source if isinstance(source, (Bias, FloatConst)) else None
        return None

    def _add(self, node: Node, shape: tuple, subtract: bool) -> Optional[Value]:
        a, b = (self._broadcast(x, shape) for x in node.args[:2])
        alpha = node.kwargs.get("alpha", 1)
        if isinstance(a, Affine) and isinstance(b, Affine) and isinstance(alpha, int) \
                and not isinstance(alpha, bool):
            return a.plus(b.scaled(-alpha if subtract else alpha))
        if isinstance(alpha, int) and not isinstance(alpha, bool):
            summed = _sum_plus(a, b, -alpha if subtract else alpha)
            if summed is not None:
                return summed
        if not subtract and alpha == 1:
            return _add_biases(a, b)
        return None

    def _mul(self, node: Node, shape: tuple) -> Optional[Value]:
        a, b = (self._broadcast(x, shape) for x in node.args[:2])
        for one, other in ((a, b), (b, a)):
            factor = concrete(one.const) if isinstance(one, Affine) and one.is_constant else None
            if factor is not None and isinstance(other, (Affine, ReadSum)):
                return _normal(other.scaled(factor))
        if isinstance(a, Predicate) and isinstance(b, Predicate):  # bool * bool is "and"
            return a.both(b)
        return None

    def _cumsum(self, node: Node, shape: tuple) -> Optional[Value]:
        source = self.value(node.args[0])
        if isinstance(source, Predicate) and (source.always or source.never):
            source = Affine(0 if source.never else 1, tuple(0 for _ in shape))
        if not isinstance(source, Affine) or not source.is_constant:
            return None
        dim = node.args[1] % len(shape)
        # cumsum of c along d is c * (i[d] + 1).
        coefs = tuple(source.const if d == dim and not is_unit(shape[d]) else 0
                      for d in range(len(shape)))
        return Affine(source.const, coefs)

    def _cat(self, node: Node, shape: tuple) -> Optional[Value]:
        """An Affine when the pieces continue one another along the cat dimension."""
        pieces = [p for p in node.args[0]]
        dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % len(shape)
        values = [self.value(p) for p in pieces]
        if not values or not all(isinstance(v, Affine) for v in values):
            return None
        sizes = [ops.shape(p)[dim] for p in pieces]
        slope = next((v.coefs[dim] for v, n in zip(values, sizes) if not is_unit(n)), None)
        if slope is None:
            if len(values) < 2:
                return None
            slope = values[1].const - values[0].const
        first = values[0]
        offset: Size = 0
        for piece, size in zip(values, sizes):
            if len(piece.coefs) != len(shape):
                return None
            expected_const = first.const + slope * offset
            if not same_size(piece.const, expected_const):
                return None
            for d in range(len(shape)):
                if d != dim and not same_size(piece.coefs[d], first.coefs[d]):
                    return None
            if not is_unit(size) and not same_size(piece.coefs[dim], slope):
                return None
            offset = offset + size
        coefs = tuple(slope if d == dim else first.coefs[d] for d in range(len(shape)))
        return Affine(first.const, _drop_unit(coefs, shape))

    def _index(self, node: Node, shape: tuple) -> Optional[Value]:
        """x[i0, i1, ...] with integer index tensors for the leading dimensions (no None)."""
        source, indices = node.args[0], list(node.args[1])
        if any(not isinstance(i, Node) for i in indices):
            return None
        src_shape = ops.shape(source)
        index_shapes = [ops.shape(i) for i in indices]
        rank = max(len(s) for s in index_shapes)
        lead = shape[:rank]
        index_map = []
        for index, index_shape, size in zip(indices, index_shapes, src_shape):
            value = self._mapped(index, _broadcast_map(index_shape, lead), lead)
            if not isinstance(value, Affine) or not _within(value, lead, size):
                return None
            index_map.append(Affine(value.const, value.coefs + tuple(0 for _ in shape[rank:])))
        for d in range(len(indices), len(src_shape)):
            index_map.append(_coordinate(rank + d - len(indices), len(shape)))
        return self._mapped(source, tuple(index_map), shape)

    # --- predicates -------------------------------------------------------------------------

    def _compare(self, node: Node, shape: tuple) -> Optional[Value]:
        a, b = (self._broadcast(x, shape) for x in node.args[:2])
        diff = _sum_plus(b, a, -1)  # b - a
        if diff is None:
            return None
        kind = _COMPARISONS[node.target]
        leaf = Leaf(node, _own_dims(shape))
        if isinstance(diff, ReadSum):
            return _read_comparison(kind, diff, leaf)
        if kind in ("eq", "ne"):
            if diff.is_constant and concrete(diff.const) is not None:
                equal = concrete(diff.const) == 0
                return Predicate(never=(equal != (kind == "eq")))
            if kind == "ne":
                return None
            return Predicate((Bound(diff, None), Bound(diff.scaled(-1), None)))
        bound = {"le": diff, "lt": diff.shifted(-1), "ge": diff.scaled(-1),
                 "gt": diff.scaled(-1).shifted(-1)}[kind]
        return _bound_predicate(Bound(bound, leaf))

    def _triangle(self, node: Node, shape: tuple) -> Optional[Value]:
        """tril(x, k) keeps x where col - row <= k, triu(x, k) where col - row >= k; other
        elements become 0 (False, or a visible 0 bias)."""
        if len(shape) < 2:
            return None
        diagonal = ops.arg(node, 1, "diagonal", 0)
        if not isinstance(diagonal, (int, torch.SymInt)) or isinstance(diagonal, bool):
            return None
        coefs = [0] * len(shape)
        coefs[-1], coefs[-2] = 1, -1  # col - row
        col_minus_row = Affine(0, _drop_unit(tuple(coefs), shape))
        if node.target == aten.tril.default:
            kept = Bound(col_minus_row.scaled(-1).shifted(diagonal), None)   # k - (c - r) >= 0
        else:
            kept = Bound(col_minus_row.shifted(-diagonal), None)             # (c - r) - k >= 0
        source = self.value(node.args[0])
        if isinstance(source, Predicate) and source.always:
            return Predicate((replace(kept, leaf=Leaf(node, _own_dims(shape))),))
        if isinstance(source, Predicate):
            return source.both(Predicate((kept,)))
        if isinstance(source, FloatConst) and source.value <= ops.HIDDEN_BIAS:
            # The kept part is hidden, the rest is a 0 bias: visible where the bound fails.
            return Bias(Predicate((kept.negated(None),)), source.value)
        if isinstance(source, FloatConst) and source.value == 0:
            return source
        return None

    def _where(self, node: Node, shape: tuple) -> Optional[Value]:
        condition = self._broadcast(node.args[0], shape)
        a, b = (self._broadcast(x, shape) for x in node.args[1:3])
        if not isinstance(condition, Predicate):
            return None
        if _is_zero(a) and _is_hidden(b):
            return Bias(condition, b.value)
        if _is_hidden(a) and _is_zero(b):
            hidden = negate(condition, None)
            return Bias(hidden, a.value) if hidden is not None else None
        return None

    def _masked_fill(self, node: Node, shape: tuple) -> Optional[Value]:
        source = self._broadcast(node.args[0], shape)
        condition = self._broadcast(node.args[1], shape)
        fill = _python_constant(node.args[2]) if not isinstance(node.args[2], Node) \
            else self._broadcast(node.args[2], shape)
        if not isinstance(condition, Predicate):
            return None
        kept = negate(condition, None)
        if kept is None:
            return None
        if isinstance(source, Predicate) and isinstance(fill, Predicate) and fill.never:
            return source.both(kept)
        if _is_hidden(fill):
            if _is_zero(source):
                return Bias(kept, fill.value)
            if isinstance(source, Bias):
                return Bias(source.visible.both(kept), max(source.hidden, fill.value))
        return None


# --- helpers ------------------------------------------------------------------------------

_COMPARISONS = {aten.le.Tensor: "le", aten.le.Scalar: "le", aten.lt.Tensor: "lt",
                aten.lt.Scalar: "lt", aten.ge.Tensor: "ge", aten.ge.Scalar: "ge",
                aten.gt.Tensor: "gt", aten.gt.Scalar: "gt", aten.eq.Tensor: "eq",
                aten.eq.Scalar: "eq", aten.ne.Tensor: "ne", aten.ne.Scalar: "ne"}

_CONSTANT_BUILDERS = {aten.full.default, aten.full_like.default, aten.new_full.default,
                      aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default,
                      aten.ones.default, aten.ones_like.default, aten.new_ones.default,
                      aten.scalar_tensor.default}


# Where each constant builder takes its fill value (the rest fill with 0 or 1).
_FILL_ARG = {aten.full.default: 1, aten.full_like.default: 1, aten.new_full.default: 2,
             aten.scalar_tensor.default: 0}


def _constant(node: Node, value: torch.Tensor) -> Optional[Value]:
    fill = node.args[_FILL_ARG[node.target]] if node.target in _FILL_ARG else None
    # aten_ops.scalar_value reads numbers only; a bool fill (full([], True)) is read here.
    number = float(fill) if isinstance(fill, bool) else ops.scalar_value(node)
    if number is None:
        return None
    return _typed_constant(number, value.dtype, value.dim())


def _python_constant(x: Any, rank: int = 0) -> Optional[Value]:
    if isinstance(x, bool):
        return Predicate(never=not x)
    if isinstance(x, (int, torch.SymInt)):
        return Affine(x, tuple(0 for _ in range(rank)))
    if isinstance(x, float):
        return FloatConst(x)
    return None


def _typed_constant(number: float, dtype: torch.dtype, rank: int) -> Optional[Value]:
    if dtype == torch.bool:
        return Predicate(never=number == 0)
    if dtype in INT_DTYPES and number == int(number):
        return Affine(int(number), tuple(0 for _ in range(rank)))
    if dtype in ops.FLOAT_DTYPES:
        return FloatConst(number)
    return None


def _arange(node: Node, value: torch.Tensor) -> Optional[Value]:
    if value.dtype not in INT_DTYPES or value.dim() != 1:
        return None
    if node.target == prims.iota.default:
        start, step = node.kwargs.get("start", 0), node.kwargs.get("step", 1)
    elif node.target == aten.arange.default:
        start, step = 0, 1
    else:
        start = node.args[0]
        step = node.args[2] if len(node.args) > 2 else node.kwargs.get("step", 1)
    start, step = ops.val(start), ops.val(step)  # symbolic ints arrive as graph nodes
    if not all(isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool)
               for x in (start, step)):
        return None
    return Affine(start, _drop_unit((step,), value.shape))


def _checked_kind(result: Optional[Value], dtype: torch.dtype) -> Optional[Value]:
    """A value is only trusted for the dtype it describes."""
    if isinstance(result, (Affine, ReadSum)) and dtype in INT_DTYPES:
        return result
    if isinstance(result, Predicate) and dtype == torch.bool:
        return result
    if isinstance(result, (Bias, FloatConst)) and dtype in ops.FLOAT_DTYPES:
        return result
    return None


def _own_dims(shape: Sequence[Size]) -> tuple:
    return tuple(None if is_unit(n) else d for d, n in enumerate(shape))


def _drop_unit(coefs: tuple, shape: Sequence[Size]) -> tuple:
    return tuple(0 if is_unit(n) else c for c, n in zip(coefs, shape))


def _coordinate(dim: int, rank: int) -> Affine:
    return Affine(0, tuple(1 if d == dim else 0 for d in range(rank)))


def _broadcast_map(in_shape: Sequence[Size], out_shape: Sequence[Size]) -> IndexMap:
    offset = len(out_shape) - len(in_shape)
    if offset < 0:
        raise ValueError("operand has more dimensions than the result")
    return tuple(Affine(0, tuple(0 for _ in out_shape)) if is_unit(n)
                 else _coordinate(offset + d, len(out_shape)) for d, n in enumerate(in_shape))


def _view_map(node: Node, shape: tuple) -> Optional[IndexMap]:
    """The input coordinates of a view-like op, or None if `node` is not one we can map."""
    target = node.target
    if target in ops.IDENTITIES:
        return tuple(_coordinate(d, len(shape)) for d in range(len(shape)))
    source = node.args[0] if node.args else None
    if not isinstance(source, Node) or ops.tensor_val(source) is None:
        return None
    in_shape = ops.shape(source)
    rank = len(shape)
    if target in ops.EXPANDS:
        return _broadcast_map(in_shape, shape)
    if target in ops.RESHAPES:
        return _unit_reshape_map(in_shape, shape)
    if target in ops.PERMUTES:
        in_rank = len(in_shape)
        if target == aten.permute.default:
            perm = [p % in_rank for p in node.args[1]]
        elif target == aten.transpose.int:
            perm = list(range(in_rank))
            a, b = node.args[1] % in_rank, node.args[2] % in_rank
            perm[a], perm[b] = perm[b], perm[a]
        else:
            perm = list(reversed(range(in_rank)))
        mapping: list = [None] * in_rank
        for out_dim, in_dim in enumerate(perm):
            mapping[in_dim] = _coordinate(out_dim, rank)
        return tuple(mapping)
    if target == aten.slice.Tensor:
        dim = ops.arg(node, 1, "dim", 0) % len(in_shape)
        start = ops.arg(node, 2, "start", None) or 0
        step = ops.arg(node, 4, "step", 1)
        if isinstance(start, int) and start < 0:
            start = start + in_shape[dim] if isinstance(in_shape[dim], int) else None
        if start is None or not isinstance(step, int) or step < 1 \
                or not same_size(torch.sym_max(start, 0), start):
            return None
        return tuple(Affine(start, tuple(step if o == d else 0 for o in range(rank)))
                     if d == dim else _coordinate(d, rank) for d in range(len(in_shape)))
    if target == aten.select.int:
        dim, index = node.args[1] % len(in_shape), node.args[2]
        if isinstance(index, int) and index < 0:
            index = index + in_shape[dim] if isinstance(in_shape[dim], int) else None
        if index is None:
            return None
        return tuple(Affine(index, tuple(0 for _ in range(rank))) if d == dim
                     else _coordinate(d if d < dim else d - 1, rank)
                     for d in range(len(in_shape)))
    return None


def _unit_reshape_map(in_shape: Sequence[Size], out_shape: Sequence[Size]) -> Optional[IndexMap]:
    """A reshape that only adds or removes size-1 dimensions."""
    ins = [d for d, n in enumerate(in_shape) if not is_unit(n)]
    outs = [d for d, n in enumerate(out_shape) if not is_unit(n)]
    if len(ins) != len(outs) or not all(same_size(in_shape[i], out_shape[o])
                                        for i, o in zip(ins, outs)):
        return None
    pairs = dict(zip(ins, outs))
    rank = len(out_shape)
    return tuple(_coordinate(pairs[d], rank) if d in pairs else Affine(0, (0,) * rank)
                 for d in range(len(in_shape)))


def _apply_map(value: Optional[Value], index_map: IndexMap, in_shape: Sequence[Size],
               out_shape: Sequence[Size]) -> Optional[Value]:
    if value is None or isinstance(value, FloatConst):
        return value
    if isinstance(value, Affine):
        return _compose(value, index_map, out_shape)
    if isinstance(value, ReadSum):
        return _compose_sum(value, index_map, out_shape)
    if isinstance(value, Bias):
        visible = _apply_map(value.visible, index_map, in_shape, out_shape)
        return Bias(visible, value.hidden) if visible is not None else None
    if value.never or value.always:
        return value
    bounds = tuple(Bound(_compose(b.expr, index_map, out_shape),
                         _map_leaf(b.leaf, index_map, in_shape, out_shape)) for b in value.bounds)
    leaves = tuple(_map_leaf(leaf, index_map, in_shape, out_shape) for leaf in value.leaves)
    if any(leaf is None for leaf in leaves):
        return None
    read_bounds = tuple(ReadBound(_compose_sum(b.expr, index_map, out_shape),
                                  _map_leaf(b.leaf, index_map, in_shape, out_shape))
                        for b in value.read_bounds)
    return Predicate(bounds, leaves, read_bounds=read_bounds)


def _compose(value: Affine, index_map: IndexMap, out_shape: Sequence[Size]) -> Affine:
    result = Affine(value.const, tuple(0 for _ in out_shape))
    for coef, source in zip(value.coefs, index_map):
        if not same_size(coef, 0):
            result = result.plus(source.scaled(coef))
    return Affine(result.const, _drop_unit(result.coefs, out_shape))


def _map_leaf(leaf: Optional[Leaf], index_map: IndexMap, in_shape: Sequence[Size],
              out_shape: Sequence[Size]) -> Optional[Leaf]:
    """The leaf in output coordinates; None when a dimension it runs along is not read one to
    one (a slice, a gather, a selected index): then the node cannot be reused as it is."""
    if leaf is None:
        return None
    dims = []
    for d in leaf.dims:
        if d is None:
            dims.append(None)
            continue
        source = index_map[d]
        ones = [o for o, c in enumerate(source.coefs) if not same_size(c, 0)]
        if len(ones) != 1 or not same_size(source.coefs[ones[0]], 1) \
                or not same_size(source.const, 0) \
                or not same_size(in_shape[d], out_shape[ones[0]]):
            return None
        dims.append(ones[0])
    return replace(leaf, dims=tuple(dims))


def _within(index: Affine, shape: Sequence[Size], size: Size) -> bool:
    """Every value of the index lies in [0, size): indexing reads in bounds, never wraps."""
    low = high = index.const
    for coef, n in zip(index.coefs, shape):
        c = concrete(coef) if not isinstance(coef, int) else coef
        if c is None:
            return False
        span = c * (n - 1)
        if c >= 0:
            high = high + span
        else:
            low = low + span
    return same_size(torch.sym_max(low, 0), low) and same_size(torch.sym_min(high, size - 1), high)


def _bound_predicate(bound: Bound) -> Predicate:
    if bound.expr.is_constant and concrete(bound.expr.const) is not None:
        return Predicate(never=concrete(bound.expr.const) < 0)
    return Predicate((bound,))


def negate(predicate: Optional[Predicate], leaf: Optional[Leaf]) -> Optional[Predicate]:
    """not P, when P is one condition (or constant). `leaf`: a node computing not P, if any."""
    if predicate is None:
        return None
    if predicate.never or predicate.always:
        return Predicate(never=not predicate.never)
    if predicate.parts != 1:
        return Predicate(leaves=(leaf,)) if leaf is not None else None
    if predicate.bounds:
        return Predicate((predicate.bounds[0].negated(leaf),))
    if predicate.read_bounds:
        return Predicate(read_bounds=(predicate.read_bounds[0].negated(leaf),))
    only = predicate.leaves[0]
    return Predicate(leaves=(leaf if leaf is not None
                             else replace(only, negated=not only.negated),))


def _is_zero(value: Optional[Value]) -> bool:
    return isinstance(value, FloatConst) and value.value == 0


def _is_hidden(value: Optional[Value]) -> bool:
    return isinstance(value, FloatConst) and value.value <= ops.HIDDEN_BIAS


def _add_biases(a: Optional[Value], b: Optional[Value]) -> Optional[Value]:
    """0 + 0 = 0, and a hidden value plus 0 or another hidden value stays hidden."""
    if _is_zero(a):
        return b if isinstance(b, (Bias, FloatConst)) else None
    if _is_zero(b):
        return a if isinstance(a, (Bias, FloatConst)) else None
    if isinstance(a, Bias) and isinstance(b, Bias):
        return Bias(a.visible.both(b.visible), max(a.hidden, b.hidden))
    return None


# --- reads of opaque integer nodes ----------------------------------------------------------

_NE = {aten.ne.Tensor, aten.ne.Scalar}
_EQ = {aten.eq.Tensor, aten.eq.Scalar}


def _dtype(node: Any) -> Optional[torch.dtype]:
    value = ops.tensor_val(node) if isinstance(node, Node) else None
    return value.dtype if value is not None else None


def _same_at(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(
        same_size(x.const, y.const) and len(x.coefs) == len(y.coefs)
        and all(same_size(c, d) for c, d in zip(x.coefs, y.coefs)) for x, y in zip(a, b))


def _normal(value: Optional[Value]) -> Optional[Value]:
    """A ReadSum without reads is an Affine."""
    if isinstance(value, ReadSum) and not value.terms:
        return value.base
    return value


def _sum_plus(a: Optional[Value], b: Optional[Value], factor: Size) -> Optional[Value]:
    """a + factor * b for Affines and ReadSums (an Affine when the reads cancel), else None."""
    if not all(isinstance(x, (Affine, ReadSum)) for x in (a, b)):
        return None
    a, b = (x if isinstance(x, ReadSum) else ReadSum(x, ()) for x in (a, b))
    terms = list(a.terms)
    for coef, read in b.terms:
        coef = coef * factor
        for k, (have, other) in enumerate(terms):
            if other.node is read.node and _same_at(other.at, read.at):
                terms[k] = (have + coef, other)
                break
        else:
            terms.append((coef, read))
    terms = tuple((c, r) for c, r in terms if not same_size(c, 0))
    return _normal(ReadSum(a.base.plus(b.base.scaled(factor)), terms))


def _compose_sum(value: ReadSum, index_map: IndexMap, out_shape: Sequence[Size]) -> ReadSum:
    terms = tuple((c, Read(r.node, tuple(_compose(x, index_map, out_shape) for x in r.at)))
                  for c, r in value.terms)
    return ReadSum(_compose(value.base, index_map, out_shape), terms)


def _shift_map(rank: int, dim: int, amount: int) -> IndexMap:
    """Reads the input at index + amount along dim (a slice starting at amount), else as is."""
    return tuple(Affine(amount, _coordinate(d, rank).coefs) if d == dim else _coordinate(d, rank)
                 for d in range(rank))


def _read_comparison(kind: str, diff: ReadSum, leaf: Leaf) -> Optional[Predicate]:
    """a <kind> b with diff = b - a holding reads of opaque nodes."""
    if kind == "ne":
        return None  # not a conjunction of bounds: the compare node stays a leaf
    if kind == "eq":
        return Predicate(read_bounds=(ReadBound(diff, None), ReadBound(diff.scaled(-1), None)))
    expr = {"le": diff, "lt": diff.shifted(-1), "ge": diff.scaled(-1),
            "gt": diff.scaled(-1).shifted(-1)}[kind]
    return Predicate(read_bounds=(ReadBound(expr, leaf),))


def _as_labels(not_one: ReadSum, dim: int, shape: Sequence[Size]) -> Optional[Labels]:
    """Labels when not_one (or its negation) is P[at(i)] - P[at(i) - e] - 1, with P's
    coordinate along one dimension pd stepping exactly with i[dim] and no other coordinate
    depending on it (so the read at i - e_dim is the read at i minus e)."""
    for expr in (not_one, not_one.scaled(-1)):
        if not expr.base.is_constant or not same_size(expr.base.const, -1) \
                or len(expr.terms) != 2:
            continue
        plus = [r for c, r in expr.terms if same_size(c, 1)]
        minus = [r for c, r in expr.terms if same_size(c, -1)]
        if len(plus) != 1 or len(minus) != 1 or plus[0].node is not minus[0].node:
            continue
        at, before = plus[0].at, minus[0].at
        stepping = [d for d, x in enumerate(at) if not same_size(x.coefs[dim], 0)]
        if len(stepping) != 1 or not same_size(at[stepping[0]].coefs[dim], 1) \
                or is_unit(shape[dim]):
            continue
        expected = tuple(x.shifted(-1) if d == stepping[0] else x for d, x in enumerate(at))
        if _same_at(before, expected):
            return Labels(plus[0], dim)
    return None


def label_difference(expr: ReadSum) -> Optional[tuple[Node, tuple, tuple]]:
    """(L, a, b) when expr is exactly L[a] - L[b] (one node read twice, no constant)."""
    if not expr.base.is_constant or not same_size(expr.base.const, 0) or len(expr.terms) != 2:
        return None
    plus = [r for c, r in expr.terms if same_size(c, 1)]
    minus = [r for c, r in expr.terms if same_size(c, -1)]
    if len(plus) != 1 or len(minus) != 1 or plus[0].node is not minus[0].node:
        return None
    return plus[0].node, plus[0].at, minus[0].at


def same_affine(a: Affine, b: Affine) -> bool:
    return _same_at((a,), (b,))
