"""What the indexer matcher finds: the operands it traced (each with the chain of value-preserving
ops that feeds it), the masks, and the result for one top-k, a proven IndexerSite (everything the
rewrite needs) or a SiteRefusal (a reason code from reasons.py and a detail for the report)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch.fx import Node

from . import aten_ops as ops
from .axis_labels import Dims, LabelSpace


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


def k_top_text(k_top: Any) -> Any:
    if isinstance(k_top, int):
        return k_top
    return str(ops.val(k_top)) if isinstance(k_top, Node) else str(k_top)
