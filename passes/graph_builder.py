"""Inserting nodes into an ATen graph the way the compiler expects them: each new node gets its
node.meta["val"] by running the op on the inputs' fake values under the graph's fake mode (so
Inductor can lower it and later passes can read shapes), and inherits the provenance (stack trace,
module stack) of the node it replaces. Also rearranges labelled tensors (axis_labels.py) into the
canonical layouts the misa ops take.

Inside Inductor the pass runs after Inductor's decompositions, on a graph Inductor then lowers op
by op; an op it decomposes has no lowering there (torch 2.11: every `arange`, `_to_copy`,
`masked_fill`) and would fail the compile ("both a fallback and a decomp for same op"). A builder
made `for_inductor` therefore spells those ops as what they decompose to, and refuses (raises
NotLowerable, so the site is left untouched and reported) any other op that Inductor on the
installed torch could not lower."""
from __future__ import annotations

import operator
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch._guards import detect_fake_mode
from torch.fx import Graph, Node
from torch.fx.node import map_arg

from .axis_labels import Dims, LabelSpace, LayoutError

aten = torch.ops.aten
prims = torch.ops.prims

SizeArg = Union[int, Node]
_PROVENANCE = ("stack_trace", "nn_module_stack", "source_fn_stack", "seq_nr", "from_node")


class NotLowerable(Exception):
    """An op the rewrite needs has no Inductor lowering on the installed torch."""


class GraphBuilder:
    """Creates nodes right before `anchor`; remembers them so a failed rewrite can undo itself.
    for_inductor: the graph is one Inductor lowers next (see the module docstring)."""

    def __init__(self, graph: Graph, anchor: Node, for_inductor: bool = False) -> None:
        self.graph = graph
        self.anchor = anchor
        fakes = [n.meta.get("val") for n in graph.nodes]
        self.fake_mode = detect_fake_mode([v for v in fakes if isinstance(v, torch.Tensor)])
        self.created: list[Node] = []
        self.for_inductor = for_inductor

    def call(self, target: Callable, *args: Any, **kwargs: Any) -> Node:
        if self.for_inductor:
            respelled = self._lowerable(target, args, kwargs)
            if respelled is not None:
                return respelled
            _require_lowering(target)
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, tuple(args), kwargs)
        self.created.append(node)
        for key in _PROVENANCE:
            if key in self.anchor.meta:
                node.meta[key] = self.anchor.meta[key]
        fake_args = map_arg(tuple(args), lambda n: n.meta["val"])
        fake_kwargs = map_arg(kwargs, lambda n: n.meta["val"])
        if self.fake_mode is not None:
            with self.fake_mode:
                node.meta["val"] = target(*fake_args, **fake_kwargs)
        else:
            node.meta["val"] = target(*fake_args, **fake_kwargs)
        return node

    def _lowerable(self, target: Callable, args: tuple, kwargs: dict) -> Optional[Node]:
        """The node for an op Inductor decomposes, spelled as its decomposition; else None."""
        if target == aten._to_copy.default and set(kwargs) == {"dtype"}:
            return self.call(prims.convert_element_type.default, args[0], kwargs["dtype"])
        if target == aten.arange.start_step:
            start, end, step = args
            length = max(0, -((start - end) // step))  # len(range(start, end, step))
            return self.call(prims.iota.default, length, start=start, step=step,
                             dtype=kwargs["dtype"], device=kwargs["device"], requires_grad=False)
        if target == aten.masked_fill.Scalar:
            source, hide, value = args
            like = source.meta["val"]
            fill = self.call(aten.full.default, [], value, dtype=like.dtype, device=like.device,
                             pin_memory=False)
            return self.call(aten.where.self, hide, fill, source)
        return None

    def undo(self) -> None:
        """Removes every node created so far. Only created nodes may use them (the rewrite moves
        the original users last), so erasing newest first leaves the graph as it was."""
        for node in reversed(self.created):
            self.graph.erase_node(node)
        self.created.clear()


def _require_lowering(target: Callable) -> None:
    if not isinstance(target, torch._ops.OpOverload):
        return  # operator.getitem and the like: Inductor handles them itself
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.lowering import lowerings

    if target in select_decomp_table() and target not in lowerings:
        raise NotLowerable(f"Inductor on torch {torch.__version__} decomposes {target} and has "
                           "no lowering for it after its decompositions")


class Arranger:
    """Moves labelled tensors between layouts with reshape/squeeze/permute/unsqueeze/expand.
    `size_of(label)` gives each label's size as an int or a node computing the SymInt."""

    def __init__(self, builder: GraphBuilder, space: LabelSpace,
                 size_of: Callable[[int], SizeArg]) -> None:
        self.b = builder
        self.space = space
        self.size_of = size_of

    def to_canonical(self, node: Node, dims: Dims, target: Sequence[Optional[int]],
                     expand: bool = False) -> Node:
        """`node` with labelled `dims` -> a tensor whose dimension i is label target[i] (None:
        a size-1 dimension). Labels the node does not carry become size-1 dimensions, expanded
        to full size when `expand`. The node must not carry labels outside `target`."""
        dims = self.space.resolve_dims(dims)
        if any(len(group) > 1 for group in dims):
            # Split merged dimensions (row-major keeps the label order; size-1 ones are dropped).
            dims = [(label,) for group in dims for label in group]
            node = self.b.call(aten.reshape.default, node,
                               [self.size_of(group[0]) for group in dims])
        units = [i for i, group in enumerate(dims) if not group]
        if units:
            node = self._squeeze(node, units)
            dims = [group for group in dims if group]
        present = [group[0] for group in dims]
        wanted = [label for label in target if label is not None and label in present]
        if len(wanted) != len(present):
            raise LayoutError("tensor carries an axis the target layout does not have")
        perm = [present.index(label) for label in wanted]
        if perm != list(range(len(perm))):
            node = self.b.call(aten.permute.default, node, perm)
        for i, label in enumerate(target):
            if label is None or label not in present:
                node = self.b.call(aten.unsqueeze.default, node, i)
        if expand and any(label is not None and label not in present for label in target):
            sizes = [-1 if label is None or label in present else self.size_of(label)
                     for label in target]
            node = self.b.call(aten.expand.default, node, sizes)
        return node

    def from_canonical(self, node: Node, source: Sequence[Optional[int]], dims: Dims,
                       sizes: dict[int, SizeArg]) -> Node:
        """The inverse: a tensor laid out as `source` labels -> the layout `dims` (which may
        merge labels or hold size-1 dimensions). `sizes` overrides size_of for new labels."""
        dims = self.space.resolve_dims(dims)
        flat = [label for group in dims for label in group]
        squeeze = [i for i, label in enumerate(source) if label is None or label not in flat]
        if squeeze:
            node = self._squeeze(node, squeeze)
        present = [label for label in source if label is not None and label in flat]
        if sorted(present) != sorted(flat):
            raise LayoutError("result layout needs an axis the op does not produce")
        perm = [present.index(label) for label in flat]
        if perm != list(range(len(perm))):
            node = self.b.call(aten.permute.default, node, perm)
        if all(len(group) == 1 for group in dims):
            return node
        if all(len(group) <= 1 for group in dims):
            for i, group in enumerate(dims):
                if not group:
                    node = self.b.call(aten.unsqueeze.default, node, i)
            return node
        shape = [self._group_size(group, sizes) for group in dims]
        return self.b.call(aten.reshape.default, node, shape)

    def _group_size(self, group: Sequence[int], sizes: dict[int, SizeArg]) -> SizeArg:
        total: SizeArg = 1
        for label in group:
            size = sizes[label] if label in sizes else self.size_of(label)
            if isinstance(total, int) and isinstance(size, int):
                total = total * size
            else:
                total = self.b.call(operator.mul, total, size)
        return total

    def _squeeze(self, node: Node, dims: list[int]) -> Node:
        for dim in reversed(dims):
            node = self.b.call(aten.squeeze.dim, node, dim)
        return node
