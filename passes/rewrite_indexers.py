"""Replace every proven DSA indexer site of an ATen graph by the misa ops of a MisaConfig.

For each IndexerSite (find_indexers.py, indexer_site.py) the rewrite
  1. rearranges the site's own q, k and weights into q [B,S,H,D], k [B,T,D], w [B,S,H] (a flat
     [N,H,D] layout gets B=1; a missing query axis gets S=1), multiplying several weight factors;
  2. folds the visibility the graph proves (fold_visibility.py: a causal mask built from
     positions becomes causal=True, other proven bounds key_start/key_end) and turns what is left
     into the op's `mask` [B,S,T] (bool, True = visible, broadcast with stride 0 where it does not
     vary along an axis; or additive float with the positive scales applied after it);
  3. emits the chain kernels/indexer.py's indexer_topk builds for the variant, with the positive
     scale factors folded into `scale` (dense_topk when T is static and below config.min_keys);
  4. puts the results back in the top-k's layout and dtypes (values cast to the score dtype,
     indices int64) and hands them to the top-k's users;
then removes the dead dense scores. Sites the matcher refused, and sites the configuration does
not fit, are left as they are and reported."""
from __future__ import annotations

import logging
import operator
from typing import Collection, Optional, Union

import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..config import MisaConfig
from ..kernels.coverage import variant_fallback_reason
from ..report import SiteRecord, SiteReport
from . import aten_ops as ops
from . import reasons as R
from .axis_labels import LayoutError, concrete, size_hint
from .find_indexers import find_indexer_sites
from .fold_visibility import KeyBound, SegmentBound, SiteVisibility, plan_visibility
from .graph_builder import Arranger, GraphBuilder, NotLowerable
from .indexer_site import IndexerSite, SiteRefusal

aten = torch.ops.aten
logger = logging.getLogger("misa_compile")
OP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def rewrite_indexer_sites(gm: Union[GraphModule, Graph], config: MisaConfig, *,
                          python_scalar_inputs: Collection[int] = (),
                          for_inductor: bool = False) -> SiteReport:
    """Finds, rewrites and reports every indexer site of `gm` (a GraphModule or its Graph, from
    Dynamo/AOT or from torch.export(...).run_decompositions()). The graph is changed in place and
    cleaned up (dead code, lint, recompile) only if a site was rewritten.

    python_scalar_inputs: positions of the graph inputs that carry a Python number as a 0-d
    tensor (the backend reads them off Dynamo's graph); scale factors read from them are folded
    exactly rather than refused for their unknown sign.
    for_inductor: Inductor lowers the graph next (graph_builder.py: what the rewrite may insert)."""
    if not isinstance(config, MisaConfig):
        raise TypeError(f"config must be a MisaConfig, got {type(config).__name__}")
    graph = gm.graph if isinstance(gm, GraphModule) else gm
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    scalars = [placeholders[i] for i in python_scalar_inputs if 0 <= i < len(placeholders)]
    report = SiteReport()
    for match in find_indexer_sites(graph, scalars):
        if isinstance(match, SiteRefusal):
            report.add(_refused(match.name, match.reason, match.detail, match))
            continue
        report.add(_rewrite_site(graph, match, config, for_inductor))
    if report.rewritten:
        graph.eliminate_dead_code()
        graph.lint()
        owner = graph.owning_module
        if isinstance(owner, GraphModule):
            owner.recompile()
    return report


def _rewrite_site(graph: Graph, site: IndexerSite, config: MisaConfig,
                  for_inductor: bool = False) -> SiteRecord:
    config = config.for_site(site.name)  # the site's own settings (MisaConfig.sites), if any
    k_top = site.k_top
    k_check = k_top if isinstance(k_top, int) else size_hint(ops.val(k_top))
    try:
        config.check_site(site.heads, k_check)
    except ValueError as error:
        return _refused(site.name, R.CONFIG_MISMATCH, str(error), site)
    k_top_issue = _k_top_issue(k_top, config)
    if k_top_issue:
        return _refused(site.name, R.CONFIG_MISMATCH, k_top_issue, site)
    if config.context_parallel:
        refusal = _context_parallel_refusal(site, config)
        if refusal:
            return _refused(site.name, R.CONFIG_MISMATCH, refusal, site)
    keys = concrete(site.keys)
    variant = config.variant
    # Under context parallelism the site sees one shard, not the global key count min_keys is
    # about, so the fallback does not apply.
    if keys is not None and keys < config.min_keys and not config.context_parallel:
        variant = "dense"
    # Under context parallelism the sharded op takes no visibility (the site has no mask).
    visibility = SiteVisibility() if config.context_parallel else plan_visibility(site)
    builder = GraphBuilder(graph, site.topk, for_inductor)
    try:
        _emit(builder, site, config, variant, visibility)
    except LayoutError as error:
        builder.undo()
        return _refused(site.name, R.UNSUPPORTED_LAYOUT, f"could not rearrange the operands: "
                        f"{error}", site)
    except NotLowerable as error:
        builder.undo()
        return _refused(site.name, R.UNSUPPORTED_LAYOUT, str(error), site)
    except Exception as error:  # noqa: BLE001  (a failed rewrite must leave the site as it was)
        builder.undo()
        logger.warning("misa: rewriting %s failed (%s: %s); it is left untouched", site.name,
                       type(error).__name__, error)
        logger.debug("misa: traceback of the failed rewrite of %s", site.name, exc_info=True)
        return _refused(site.name, R.INTERNAL_ERROR, f"the rewrite failed: "
                        f"{type(error).__name__}: {error}", site)
    runtime = "".join(f" x {node.name}" for node, _ in site.runtime_factors)
    detail = (f"q={site.q.source.node.name} k={site.k.source.node.name} "
              f"scale={site.scale:.6g}{runtime}"
              + ("" if variant == config.variant else
                 f"; T={keys} < min_keys={config.min_keys}: dense")
              + ("; context parallel: misa::sharded_topk" if config.context_parallel else ""))
    routed = variant in ("misa", "misa_hier")
    return SiteRecord(site.name, "rewritten", "", detail, site.heads, _k_text(k_top),
                      site.layout, _dtype_text(site.dtype), site.mask_kind, variant,
                      visibility=visibility.form,
                      active_heads=config.active_heads if routed else site.heads,
                      runs=where_it_runs(site, variant, config))


def _k_top_issue(k_top, config: MisaConfig) -> str:
    """Why the variant's candidate set may hold fewer than k_top keys ("" if it never does).
    misa_hier re-ranks `candidates` keys and HISA `hisa_blocks * hisa_block`; fewer than k_top
    would pad the selection with -inf where eager selects real keys. A symbolic k_top must be
    provably within the bound for every run-time value, not only at its example value."""
    if config.variant == "misa_hier":
        bound, what = config.candidates, f"candidates={config.candidates}"
    elif config.variant == "hisa":
        bound = config.hisa_blocks * config.hisa_block
        what = f"hisa_blocks * hisa_block = {config.hisa_blocks} * {config.hisa_block}"
    else:
        return ""
    value = k_top if isinstance(k_top, int) else ops.val(k_top)
    if isinstance(value, int):
        return "" if value <= bound else f"{what} < k_top={value}: too few candidate keys"
    if statically_known_true(value <= bound):
        return ""
    return (f"k_top={value} is symbolic and not provably <= {what}: at run time it could "
            "exceed the candidate keys")


def where_it_runs(site: IndexerSite, variant: str, config: MisaConfig) -> str:
    """"triton", or "torch: <why>" on CUDA (kernels/coverage.py decides, as the CUDA registration
    does); "torch (<device>)" elsewhere, where the chunked torch implementation runs."""
    value = ops.tensor_val(site.topk.args[0])
    device = value.device if value is not None else torch.device("cpu")
    if device.type != "cuda":
        return f"torch ({device.type})"
    reason = variant_fallback_reason(variant, config.router)
    return "triton" if reason is None else f"torch: {reason}"


def _emit(builder: GraphBuilder, site: IndexerSite, config: MisaConfig, variant: str,
          visibility: SiteVisibility) -> None:
    space = site.space
    size_nodes: dict[int, Union[int, Node]] = {}

    def size_of(label: int) -> Union[int, Node]:
        size = space.size(label)
        static = concrete(size)
        if static is not None:
            return static
        if label not in size_nodes:
            size_nodes[label] = _size_node(builder, site, label)
        return size_nodes[label]

    arrange = Arranger(builder, space, size_of)
    b, s, h, d, t = site.batch, site.query, site.head, site.dim, site.key
    def operand(op, layout, narrow=False):
        link = op.pick(space)
        if narrow:
            link = _below_exact_widening(op, link, space)
        node = arrange.to_canonical(link.node, link.dims, layout)
        return _skipped_casts(builder, node, op, link, keep_narrow=narrow)

    # The ops compute in fp32 on q.float() and k.float(), so a bf16/fp16 q or k the model widens
    # to fp32 before its contraction is handed over narrow: the same math, and the kernels' dots
    # run on 16-bit tensor cores (products of 16-bit floats are exact in fp32) instead of
    # emulating fp32 with three tf32 passes (about 5x slower).
    q = _as_op_dtype(builder, operand(site.q, [b, s, h, d], narrow=True))
    k = _as_op_dtype(builder, operand(site.k, [b, t, d], narrow=True))
    w = None
    for weight in site.weights:
        factor = operand(weight, [b, s, h])
        w = factor if w is None else builder.call(aten.mul.Tensor, w, factor)
    for factor, where in site.runtime_factors:
        if where == "below":
            q = builder.call(aten.mul.Tensor, q, builder.call(aten.sign.default, factor))
            factor = builder.call(aten.abs.default, factor)
        w = builder.call(aten.mul.Tensor, w, factor)
    w = _as_op_dtype(builder, builder.call(aten.expand.default, w,
                                           [_size_or_one(size_of, x) for x in (b, s, h)]))
    vis = _visibility_args(builder, arrange, site, visibility, size_of, ops.val(q).device)
    values, indices = _indexer_chain(builder, q, k, w, site.k_top, site.scale, vis, config,
                                     variant)

    new_key = space.new(ops.val(site.k_top) if isinstance(site.k_top, Node) else site.k_top)
    out_dims = [tuple(new_key if label == t else label for label in group)
                for group in space.resolve_dims(site.score_dims)]
    new_sizes = {new_key: site.k_top}
    canonical = [b, s, new_key]
    outputs = ops.getitem_users(site.topk)
    # Every new node is built before the first use moves: a failure up to here leaves the new
    # nodes unused, and undo() removes them all, so a site is rewritten entirely or not at all.
    moves = []
    if outputs.get(0):
        result = arrange.from_canonical(values, canonical, out_dims, new_sizes)
        if site.dtype != torch.float32:
            result = builder.call(aten._to_copy.default, result, dtype=site.dtype)
        moves += [(user, result) for user in outputs[0]]
    if outputs.get(1):
        result = arrange.from_canonical(indices, canonical, out_dims, new_sizes)
        moves += [(user, result) for user in outputs[1]]
    _commit(builder.graph, site, moves)


def _commit(graph: Graph, site: IndexerSite, moves: list[tuple[Node, Node]]) -> None:
    """Hands the top-k's users to the new results; nothing here can fail halfway."""
    for user, result in moves:
        user.replace_all_uses_with(result)
    # Metadata assertions are side-effecting, so dead-code elimination keeps them, and with them
    # the dense scores they check: drop them with the site.
    for node in site.interior:
        for check in [u for u in node.users if u.target in ops.METADATA_CHECKS]:
            graph.erase_node(check)


def _context_parallel_refusal(site: IndexerSite, config: MisaConfig) -> str:
    """Why the sharded op cannot replace `site` ("" if it can). Raises if there is no process
    group to shard over: a context-parallel compile outside torch.distributed is a setup error,
    not a property of one site."""
    import torch.distributed as dist

    from ..distributed import op  # noqa: F401  (registers misa::sharded_topk)

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "MisaConfig.context_parallel=True: torch.distributed has no initialised process "
            "group; the keys of each indexer site are sharded over the default group, so call "
            "torch.distributed.init_process_group (or misa_compile.distributed.init_from_env) "
            "before compiling, or set context_parallel=False")
    if config.variant == "hisa" or site.masks:
        why = ("the variant is 'hisa'" if config.variant == "hisa" else
               f"this site's visibility is a mask tensor ({site.mask_kind})")
        return (f"context parallelism supports causal/ragged visibility only, no mask and no "
                f"HISA: {why}")
    return ""


def _indexer_chain(builder, q, k, w, k_top, scale, visibility, config, variant):
    """The ops kernels/indexer.py's indexer_topk calls for `variant`, as graph nodes; under
    context parallelism the one sharded op instead (k is this rank's key shard)."""
    misa = torch.ops.misa
    if config.context_parallel:
        # A site without a mask sees every key: causal=False and no key range, over all shards.
        out = builder.call(misa.sharded_topk.default, q, k, w, k_top, variant,
                           config.active_heads, config.block_size, config.candidates,
                           config.router, scale, False, None, None, config.query_chunk)
        return builder.call(operator.getitem, out, 0), builder.call(operator.getitem, out, 1)
    vis = (*visibility, config.query_chunk)  # causal, key_start, key_end, mask
    if variant == "dense":
        out = builder.call(misa.dense_topk.default, q, k, w, k_top, scale, *vis)
    elif variant == "hisa":
        candidates = builder.call(misa.hisa_candidates.default, q, k, w, config.hisa_block,
                                  config.hisa_blocks, *vis)
        out = builder.call(misa.rerank_topk.default, q, k, w, candidates, k_top, scale, *vis)
    else:
        heads = builder.call(misa.route_heads.default, q, k, w, config.active_heads,
                             config.block_size, config.router, *vis)
        if variant == "misa":
            out = builder.call(misa.routed_topk.default, q, k, w, heads, k_top, scale, *vis)
        else:
            routed = builder.call(misa.routed_topk.default, q, k, w, heads, config.candidates,
                                  scale, *vis)
            candidates = builder.call(operator.getitem, routed, 1)
            out = builder.call(misa.rerank_topk.default, q, k, w, candidates, k_top, scale,
                               *vis)
    return builder.call(operator.getitem, out, 0), builder.call(operator.getitem, out, 1)


def _visibility_args(builder: GraphBuilder, arrange: Arranger, site: IndexerSite,
                     visibility: SiteVisibility, size_of, device: torch.device):
    """(causal, key_start, key_end, mask) for the ops, from the site's folded visibility."""
    key_start = key_end = None
    if visibility.has_ranges:
        key_start, key_end = _key_ranges(builder, site, visibility, size_of, device)
    return visibility.causal, key_start, key_end, _mask(builder, arrange, site, visibility,
                                                        size_of)


def _key_ranges(builder: GraphBuilder, site: IndexerSite, visibility: SiteVisibility, size_of,
                device: torch.device) -> tuple[Node, Node]:
    """int64 [B,S] key_start and key_end: the tightest of the proven bounds, clamped to [0, T].
    Ranges are only folded for static S and T (fold_visibility.py), so the bounds are ints. A
    KeyBound gives one row [S] for every batch, a SegmentBound rows [B,S] (or [1,S]) read off
    the labels in the graph; maximum/minimum broadcast them together.
    Only ops that Inductor lowers as they are (the pass runs after its decompositions, so an op
    it only decomposes, like arange.default, clamp or flip, would fail to compile)."""
    queries = 1 if site.query is None else concrete(site.space.size(site.query))
    keys = concrete(site.keys)
    positions = _int_range(builder, 0, queries, 1, device)

    def rows_of(bound):
        if isinstance(bound, SegmentBound):
            return _segment_rows(builder, bound, positions, queries, device)
        return builder.call(aten.add.Tensor,
                            builder.call(aten.mul.Tensor, positions, bound.per_query), bound.const)

    def tightest(bounds, combine, default):
        result = None
        for bound in bounds or [KeyBound(default, 0)]:
            value = rows_of(bound)
            result = value if result is None else builder.call(combine, result, value)
        result = builder.call(aten.clamp_max.default,
                              builder.call(aten.clamp_min.default, result, 0), keys)
        if len(ops.shape(result)) == 1:
            result = builder.call(aten.unsqueeze.default, result, 0)
        rows = builder.call(aten.expand.default, result,
                            [_size_or_one(size_of, site.batch), queries])
        return builder.call(aten.clone.default, rows, memory_format=torch.contiguous_format)

    return (tightest(visibility.starts, aten.maximum.default, 0),
            tightest(visibility.ends, aten.minimum.default, keys))


def _int_range(builder: GraphBuilder, start: int, end: int, step: int,
               device: torch.device) -> Node:
    return builder.call(aten.arange.start_step, start, end, step, dtype=torch.int64,
                        device=device, pin_memory=False)


def _segment_rows(builder: GraphBuilder, bound: SegmentBound, positions: Node, length: int,
                  device: torch.device) -> Node:
    """int64 [R,N] from labels L [B_L,N] that never decrease along N: for each index j, the first
    index of its run of equal labels ("start") or one past the last ("end"). A run starts at j
    where L[j] != L[j-1] (or j == 0); the start of j's run is the largest such index <= j, a
    running maximum (cummax, O(N)). Ends mirror it: a run ends after j where L[j] != L[j+1] (or
    j == N-1), and j's end is the smallest such j+1 at or after j, a running minimum read from
    the right (the reversal is an index with N-1..0)."""
    labels = bound.labels
    if bound.row is not None:
        labels = builder.call(aten.slice.Tensor, labels, 0, bound.row, bound.row + 1)
    start = bound.side == "start"
    step = -1 if start else 1
    # L at j-1 (or j+1), clamped inside [0, N): the edge index is a run boundary in any case.
    neighbour = builder.call(aten.clamp_max.default, builder.call(
        aten.clamp_min.default, builder.call(aten.add.Tensor, positions, step), 0), length - 1)
    beside = builder.call(aten.index.Tensor, labels, [None, neighbour])
    boundary = builder.call(aten.bitwise_or.Tensor,
                            builder.call(aten.ne.Tensor, labels, beside),
                            builder.call(aten.eq.Scalar, positions, 0 if start else length - 1))
    if start:
        marks = builder.call(aten.mul.Tensor, positions, boundary)  # j at a start, else 0
        return builder.call(operator.getitem, builder.call(aten.cummax.default, marks, 1), 0)
    # j + 1 after a run's last index, else N:  (j + 1 - N) * boundary + N.
    marks = builder.call(aten.add.Tensor, builder.call(
        aten.mul.Tensor, builder.call(aten.sub.Tensor, positions, length - 1), boundary), length)
    reverse = _int_range(builder, length - 1, -1, -1, device)
    backwards = builder.call(aten.index.Tensor, marks, [None, reverse])
    running = builder.call(operator.getitem, builder.call(aten.cummin.default, backwards, 1), 0)
    return builder.call(aten.index.Tensor, running, [None, reverse])


def _mask(builder: GraphBuilder, arrange: Arranger, site: IndexerSite,
          visibility: SiteVisibility, size_of) -> Optional[Node]:
    """The op's mask [B,S,T] from what the visibility keeps as a mask: bool (True = visible)
    when every piece is boolean, else additive float with the boolean ones applied as -inf.
    Pieces that do not vary along an axis stay size 1 there until the final expand (a stride-0
    broadcast, which the ops read without materialising it)."""
    if not visibility.has_mask:
        return None
    b, s, t = site.batch, site.query, site.key
    visible: Optional[Node] = None
    bias: Optional[Node] = None

    def both(node):
        return node if visible is None else builder.call(aten.bitwise_and.Tensor, visible, node)

    for leaf in visibility.leaves:
        node = arrange.to_canonical(leaf.node, list(leaf.dims), [b, s, t])
        if leaf.negated:
            node = builder.call(aten.bitwise_not.default, node)
        visible = both(node)
    for mask in visibility.kept_masks:
        link = mask.operand.pick(site.space, negated=mask.invert)
        node = arrange.to_canonical(link.node, link.dims, [b, s, t])
        if mask.kind == "bool":
            if link.negated != mask.invert:
                node = builder.call(aten.bitwise_not.default, node)
            visible = both(node)
        else:
            if mask.factor != 1.0:
                node = builder.call(aten.mul.Tensor, node, mask.factor)
            bias = node if bias is None else builder.call(aten.add.Tensor, bias, node)
    full = [_size_or_one(size_of, x) for x in (b, s, t)]
    if bias is None:
        return builder.call(aten.expand.default, visible, full)
    bias = _as_op_dtype(builder, bias)
    bias = builder.call(aten.expand.default, bias, full)
    if visible is not None:
        hidden = builder.call(aten.bitwise_not.default, visible)
        bias = builder.call(aten.masked_fill.Scalar, bias, hidden, float("-inf"))
    return bias


def _skipped_casts(builder: GraphBuilder, node: Node, operand, link,
                   keep_narrow: bool = False) -> Node:
    """Re-applies, in order, the float casts between the picked link and the consumer: the link
    may sit below them (its layout is simpler) but their rounding (fp32 -> bf16 -> fp32) is part
    of what the contraction reads. Casts are elementwise, so they commute with the rearranging.
    keep_narrow: a last cast that only widens exactly is left out (see _narrow_source)."""
    chain = operand.links
    below = next(i for i, candidate in enumerate(chain) if candidate is link)
    casts = [current.node for current in reversed(chain[:below])
             if current.node.target in ops.CASTS
             and ops.val(current.node.args[0]).dtype != ops.val(current.node).dtype]
    if keep_narrow and casts and ops.is_exact_widening(casts[-1]):
        casts.pop()
    for cast in casts:
        node = builder.call(aten._to_copy.default, node, dtype=ops.val(cast).dtype)
    return node


def _below_exact_widening(operand, link, space) -> object:
    """The input of the first dtype cast at or below `link` when that cast widens exactly
    (bf16/fp16 -> fp32) and its input can be rearranged as simply as `link` (casts keep the
    dims, so it usually can); else `link`. The op widens its q and k itself, so it may read them
    narrow; _skipped_casts then re-applies every cast above but that last widening."""
    chain = operand.links
    start = next(i for i, candidate in enumerate(chain) if candidate is link)
    for i in range(start, len(chain) - 1):
        node = chain[i].node
        if node.target in ops.CASTS and ops.val(node.args[0]).dtype != ops.val(node).dtype:
            below = chain[i + 1]
            if ops.is_exact_widening(node) and type(operand)(chain[i + 1:]).pick(space) is below:
                return below
            return link
    return link


def _size_or_one(size_of, label: Optional[int]):
    return 1 if label is None else size_of(label)


def _size_node(builder: GraphBuilder, site: IndexerSite, label: int) -> Node:
    """A sym_size node for a symbolic label size, read off a tensor the site reads anyway."""
    space = site.space
    links = [op.pick(space) for op in site.operands] + [op.source for op in site.operands]
    for link in links:
        for dim, group in enumerate(space.resolve_dims(link.dims)):
            if group == (label,):
                return builder.call(aten.sym_size.int, link.node, dim)
    raise LayoutError("no operand carries the axis alone, so its symbolic size is not at hand")


def _as_op_dtype(builder: GraphBuilder, node: Node) -> Node:
    dtype = ops.val(node).dtype
    if dtype in OP_DTYPES or dtype == torch.bool:
        return node
    return builder.call(aten._to_copy.default, node, dtype=torch.float32)


def _refused(name: str, reason: str, detail: str,
             site: Union[IndexerSite, SiteRefusal, None]) -> SiteRecord:
    if isinstance(site, IndexerSite):
        info = dict(heads=site.heads, k_top=_k_text(site.k_top), layout=site.layout,
                    dtype=_dtype_text(site.dtype), mask=site.mask_kind)
    elif isinstance(site, SiteRefusal):
        info = dict(heads=site.heads, k_top=site.k_top, layout=site.layout,
                    dtype=_dtype_text(site.dtype), mask=site.mask)
    else:
        info = {}
    return SiteRecord(name, "refused", reason, detail, **info)


def _k_text(k_top):
    return k_top if isinstance(k_top, int) else str(ops.val(k_top))


def _dtype_text(dtype: Optional[torch.dtype]) -> str:
    return "" if dtype is None else str(dtype).replace("torch.", "")
