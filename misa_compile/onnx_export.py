"""misa_compile.to_onnx: a model, or a rewritten ExportedProgram, as an ONNX model whose misa ops
are standard ONNX operators (misa_compile/onnx_ops.py), ready for ONNX Runtime or TensorRT's ONNX
parser with no plugin; or, with custom_domain=True, one "misa"-domain node per op for runtimes that
bring the kernels as plugins.

    model_proto = misa_compile.to_onnx(model, (input_ids,), "model.onnx",
                                       config=MisaConfig(variant="misa"))

Before translating, every misa op is checked against what the target can express. TopK's K must
be a constant per site: a k_top that is symbolic under dynamic shapes is accepted only in the form
min(c, T) of the site's own key count T (how Hugging Face indexers spell it), which the op already
computes, so it becomes the constant c; any other symbolic k_top is refused. `topk_limit` (3840 for
TensorRT) caps K. A refused site raises UnsupportedOnnxSite naming the site and the rule."""
from __future__ import annotations

import copy
import os
from typing import Any, Iterator, Optional, Union

import onnx
import sympy
import torch
from torch.export import ExportedProgram
from torch.fx.passes.infra.pass_base import PassResult

from .config import MisaConfig
from .export import MisaExport, _first_line, export

TENSORRT_TOPK_LIMIT = 3840


class UnsupportedOnnxSite(ValueError):
    """A misa op whose configuration the ONNX translation (or the chosen TopK limit) cannot
    express."""


class OnnxExportError(RuntimeError):
    """torch.onnx.export failed on the rewritten program."""


def to_onnx(model_or_program: Union[torch.nn.Module, ExportedProgram, MisaExport],
            args: Any = (), path: Optional[Union[str, os.PathLike]] = None, *,
            kwargs: Optional[dict] = None, config: MisaConfig = MisaConfig(),
            dynamic_shapes: Any = None, custom_domain: bool = False,
            topk_limit: Optional[int] = None,
            opset_version: Optional[int] = None) -> onnx.ModelProto:
    """The ONNX model of `model_or_program`, also written to `path` when given.

    An nn.Module is first exported and rewritten by misa_compile.export(model, args, kwargs,
    config=config, dynamic_shapes=dynamic_shapes); an ExportedProgram (or MisaExport) is used as
    it is. dynamic_shapes also names the ONNX model's dynamic axes. topk_limit caps the constant K
    of every TopK the misa ops need (TENSORRT_TOPK_LIMIT for TensorRT); None means no cap."""
    if topk_limit is not None and (isinstance(topk_limit, bool) or not isinstance(topk_limit, int)
                                   or topk_limit < 1):
        raise ValueError(f"to_onnx: topk_limit={topk_limit!r}; must be an int >= 1 or None")
    if isinstance(model_or_program, MisaExport):
        program = model_or_program.program
    elif isinstance(model_or_program, ExportedProgram):
        program = model_or_program
    elif isinstance(model_or_program, torch.nn.Module):
        program = export(model_or_program, args, kwargs, config=config,
                         dynamic_shapes=dynamic_shapes).program
    else:
        raise TypeError("to_onnx: model_or_program must be an nn.Module, an ExportedProgram or a "
                        f"MisaExport, got {type(model_or_program).__name__}")
    program = with_constant_k_tops(program)
    check_onnx_sites(program, topk_limit)

    from .onnx_ops import translation_table

    try:
        onnx_program = torch.onnx.export(
            program, (), dynamo=True, verbose=False, dynamic_shapes=dynamic_shapes,
            custom_translation_table=translation_table(custom_domain),
            opset_version=opset_version)
    except Exception as error:  # the exporter's own error types vary between torch versions
        cause = _first_line(_root_cause(error))
        raise OnnxExportError(
            f"to_onnx: torch.onnx.export could not translate the program: {cause}"
            f"{_known_fix(cause)}") from error
    if path is not None:
        onnx_program.save(os.fspath(path))
    return onnx_program.model_proto


def with_constant_k_tops(program: ExportedProgram) -> ExportedProgram:
    """A copy of `program` in which every symbolic k_top of a misa op is a constant. The ops
    select min(k_top, T) keys, so a k_top of min(c, T) (T the op's own key count) is replaced by
    c. Raises UnsupportedOnnxSite for any other symbolic k_top. Returns `program` itself when all
    are constant already."""
    replacements = {}
    for node in _misa_nodes(program.graph):
        args = _bound_args(node)
        if isinstance(args.get("k_top"), torch.fx.Node):
            replacements[node.name] = _k_top_bound(node, args)
    if not replacements:
        return program

    def constant_k_tops(graph_module: torch.fx.GraphModule) -> PassResult:
        for node in _misa_nodes(graph_module.graph):
            if node.name in replacements:
                _set_arg(node, "k_top", replacements[node.name])
        graph_module.graph.eliminate_dead_code()
        graph_module.recompile()
        return PassResult(graph_module, True)

    return copy.deepcopy(program)._transform_do_not_use(constant_k_tops)


def _k_top_bound(node: torch.fx.Node, args: dict[str, Any]) -> int:
    k_top = args["k_top"].meta.get("val")
    keys = args["k"].meta["val"].shape[1]
    k_expr = getattr(getattr(k_top, "node", None), "expr", None)
    keys_expr = keys.node.expr if isinstance(keys, torch.SymInt) else sympy.Integer(keys)
    # torch writes min() of sizes with its own sympy Min class (torch.utils._sympy.functions),
    # so the function is recognised by name.
    is_min = k_expr is not None and getattr(k_expr.func, "__name__", "") == "Min"
    if is_min and len(k_expr.args) == 2 and keys_expr in k_expr.args:
        (bound,) = [arg for arg in k_expr.args if arg != keys_expr]
        if isinstance(bound, sympy.Integer) and bound > 0:
            return int(bound)
    raise UnsupportedOnnxSite(
        f"to_onnx: site {_site_name(node)} ({node.target.name()}) has a symbolic k_top={k_top}; "
        "ONNX TopK needs a constant K, and the translation expresses a symbolic k_top only as "
        f"min(c, T) of the site's key count T={keys}; export with a static key axis or a "
        "constant k_top")


def _set_arg(node: torch.fx.Node, name: str, value: Any) -> None:
    index = [arg.name for arg in node.target._schema.arguments].index(name)
    if index < len(node.args):
        node.update_arg(index, value)
    else:
        node.update_kwarg(name, value)


def _misa_nodes(graph: torch.fx.Graph) -> Iterator[torch.fx.Node]:
    for node in graph.nodes:
        if node.op == "call_function" and getattr(node.target, "namespace", None) == "misa":
            yield node


def check_onnx_sites(program: ExportedProgram, topk_limit: Optional[int] = None) -> None:
    """Raises UnsupportedOnnxSite for the first misa op whose constant TopK K exceeds topk_limit
    (k_top must already be constant: see with_constant_k_tops)."""
    if topk_limit is None:
        return
    for node, site, k, rule in _topk_sizes(program):
        if k > topk_limit:
            raise UnsupportedOnnxSite(
                f"to_onnx: site {site} ({node.target.name()}) needs TopK with k={k} ({rule}), "
                f"above topk_limit={topk_limit} (TensorRT's TopK accepts a constant k <= "
                f"{TENSORRT_TOPK_LIMIT}); lower that MisaConfig field or export without "
                "topk_limit for ONNX Runtime")


def _topk_sizes(program: ExportedProgram) -> Iterator[tuple[torch.fx.Node, str, int, str]]:
    """(node, site name, constant K, which argument sets it) of every misa op in the program.
    K is what onnx_ops emits: min(n, T) when the key count T is static, else n itself."""
    ops = torch.ops.misa
    for node in _misa_nodes(program.graph):
        args = _bound_args(node)
        keys = _static_keys(args["k"])
        packet = node.target._overloadpacket
        if packet in (ops.dense_topk, ops.routed_topk, ops.rerank_topk):
            k_top = args["k_top"]
            k = min(k_top, keys) if keys is not None else k_top
            rule = "k_top, the keys selected per query (MisaConfig.candidates for the routed " \
                   "pass of misa_hier)"
        elif packet is ops.route_heads:
            k, rule = args["active_heads"], "MisaConfig.active_heads"
        elif packet is ops.hisa_candidates:
            blocks, block = args["num_blocks"], args["block_size"]
            k = min(blocks, -(-keys // block)) if keys is not None else blocks
            rule = "MisaConfig.hisa_blocks"
        else:
            continue
        yield node, _site_name(node), k, rule


def _bound_args(node: torch.fx.Node) -> dict[str, Any]:
    schema = node.target._schema
    bound = {arg.name: arg.default_value for arg in schema.arguments if arg.has_default_value()}
    bound.update(zip((arg.name for arg in schema.arguments), node.args))
    bound.update(node.kwargs)
    return bound


def _static_keys(k_node: Any) -> Optional[int]:
    value = k_node.meta.get("val") if isinstance(k_node, torch.fx.Node) else None
    if value is None:
        return None
    keys = value.shape[1]
    return keys if isinstance(keys, int) else None


def _site_name(node: torch.fx.Node) -> str:
    """"module.path:node" as the site report spells it (the rewrite copies the replaced top-k's
    module stack onto the misa nodes)."""
    from .passes.find_indexers import site_name

    return site_name(node)


# transformers' MoE experts run, by default, its own custom op for grouped matmuls, which has no
# ONNX translation; its "batched_mm" experts are plain batched matmuls.
_GROUPED_MM_FIX = (
    "\nthe model's MoE experts run transformers' grouped_mm op, which ONNX cannot express: call "
    "model.set_experts_implementation(\"batched_mm\") (or build the model with "
    "experts_implementation=\"batched_mm\", e.g. tiny_deepseek_v32(..., "
    "experts_implementation=\"batched_mm\"); `misa export`: --factory-arg "
    "experts_implementation=batched_mm), then export again")


def _known_fix(cause: str) -> str:
    """What the user can do about a translation failure whose cause is known, else ""."""
    return _GROUPED_MM_FIX if "grouped_mm" in cause else ""


def _root_cause(error: BaseException) -> BaseException:
    """The innermost chained exception: the exporter wraps the useful message (which op has no
    ONNX function, say) in generic "step 3/3" errors."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error
