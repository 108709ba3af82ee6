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
SiteRefusal with a reason code (reasons.py); only a fully proven IndexerSite may be rewritten.

This module walks the graph and runs the search for each top-k; the pieces live in
  index_score.py      top-k input down to the head sum: views, casts, scales, masks
  per_head_score.py   the head sum's factor down to q.k: ReLU, scales, per-head weights
  contractions.py     bmm/mm, einsum and sum-of-product contractions
  scalar_factors.py   constant factors and their signs
  indexer_roles.py    q, k, weights, axes and layout; the proofs the rewrite relies on
  search.py           the search state and the operand walks shared by the above
  indexer_site.py     the results: IndexerSite, SiteRefusal and the operands they hold"""
from __future__ import annotations

import logging
from typing import Iterable, Optional, Union

import torch
from torch.fx import Graph, GraphModule, Node

from . import aten_ops as ops
from . import reasons as R
from .axis_labels import LayoutError
from .index_score import index_score
from .indexer_roles import prove_roles
from .indexer_site import IndexerSite, Match, SiteRefusal, k_top_text, site_name
from .search import NotAnIndexer, TopkSearch

aten = torch.ops.aten
logger = logging.getLogger("misa_compile")

__all__ = ["IndexerSite", "Match", "SiteRefusal", "find_indexer_sites", "site_name"]


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


def _match_topk(topk: Node, python_scalars: frozenset) -> Optional[Match]:
    search = TopkSearch(topk, python_scalars)
    try:
        return _match(search)
    except R.SiteRefused as refusal:
        return _refusal(search, refusal.reason, refusal.detail)
    except NotAnIndexer:
        return None
    except Exception as error:  # noqa: BLE001  (an unforeseen graph must never break the compile)
        # One line for the user; the traceback only for whoever debugs the pass.
        logger.warning("misa: could not analyse %s (%s: %s); it is left untouched",
                       topk.name, type(error).__name__, error)
        logger.debug("misa: traceback of the failed analysis of %s", topk.name, exc_info=True)
        return _refusal(search, R.INTERNAL_ERROR, f"the analysis failed: "
                        f"{type(error).__name__}: {error}")


def _refusal(search: TopkSearch, reason: str, detail: str) -> SiteRefusal:
    return SiteRefusal(site_name(search.topk), search.topk, reason, detail, **search.known)


def _match(search: TopkSearch) -> Optional[Match]:
    topk = search.topk
    scores = topk.args[0]
    value = ops.tensor_val(scores)
    if not isinstance(scores, Node) or value is None or value.dim() == 0:
        return None
    k_top = ops.arg(topk, 1, "k")
    dim = ops.arg(topk, 2, "dim", -1)
    search.known.update(k_top=k_top_text(k_top), dtype=value.dtype)
    try:
        dims = search.space.fresh_dims(value.shape)
        if isinstance(dim, int) and len(dims[dim % value.dim()]) == 1:
            search.top_label = dims[dim % value.dim()][0]
        outer = index_score(search, scores, dims, lookahead=True)
    except LayoutError:
        return None
    if outer is None or not isinstance(dim, int):
        return None
    top_group = search.space.resolve_dims(dims)[dim % value.dim()]
    if len(top_group) != 1:
        return None
    return prove_roles(search, outer, dims, top_group[0], k_top, value.dtype)
