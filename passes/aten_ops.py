"""The ATen vocabulary the indexer matcher understands: value-preserving ops (views, copies, float
casts) with the way each maps axis labels onto its input, the constants it can read, and the ops
that play the parts of an indexer (contractions, ReLU, masks, top-k). Both Dynamo/AOT graphs and
graphs of torch.export(...).run_decompositions() use these ops."""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
from torch.fx import Node

from .axis_labels import Dims, LabelSpace, LayoutError

aten = torch.ops.aten
prims = torch.ops.prims

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

RESHAPES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default,
            aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.default}
if hasattr(aten.squeeze, "dims"):
    RESHAPES.add(aten.squeeze.dims)
IDENTITIES = {aten.clone.default, aten.alias.default, aten.detach.default,
              aten.lift_fresh_copy.default, aten.contiguous.default}
CASTS = {aten._to_copy.default, prims.convert_element_type.default, aten.to.dtype}
PERMUTES = {aten.permute.default, aten.transpose.int, aten.t.default}
EXPANDS = {aten.expand.default}
NEGATIONS = {aten.bitwise_not.default, aten.logical_not.default}

MULS = {aten.mul.Tensor, aten.mul.Scalar}
DIVS = {aten.div.Tensor, aten.div.Scalar}
SUMS = {aten.sum.dim_IntList, aten.mean.dim}
ADDS = {aten.add.Tensor}
SUBS = {aten.sub.Tensor}
WHERES = {aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf}
MASKED_FILLS = {aten.masked_fill.Scalar, aten.masked_fill.Tensor}

# Additive masks and fills at or below this value hide a key, the convention of
# misa_compile.kernels.visibility (finfo(float16).min and finfo(float32).min both qualify).
HIDDEN_BIAS = torch.finfo(torch.float16).min


def val(node: Any):
    """The example value recorded for a node (a FakeTensor, SymInt, ...), or the constant."""
    return node.meta.get("val") if isinstance(node, Node) else node


def tensor_val(node: Any) -> Optional[torch.Tensor]:
    value = val(node)
    return value if isinstance(value, torch.Tensor) else None


def shape(node: Node) -> tuple:
    value = tensor_val(node)
    if value is None:
        raise LayoutError(f"{node.name} has no tensor value in node.meta['val']")
    return tuple(value.shape)


def arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def is_float_cast(node: Node) -> bool:
    """A cast between floating dtypes: it keeps the value (up to rounding) and the order."""
    if node.target not in CASTS:
        return False
    src, dst = tensor_val(node.args[0]), tensor_val(node)
    if src is None or dst is None or src.device != dst.device:
        return False
    return src.dtype in FLOAT_DTYPES and dst.dtype in FLOAT_DTYPES


# (source, destination) float dtypes where the destination holds every source value exactly.
_EXACT_WIDENINGS = {(torch.float16, torch.float32), (torch.float16, torch.float64),
                    (torch.bfloat16, torch.float32), (torch.bfloat16, torch.float64),
                    (torch.float32, torch.float64)}


def is_exact_widening(node: Node) -> bool:
    """A float cast whose destination holds every source value exactly (bf16/fp16 -> fp32, ...)."""
    if not is_float_cast(node):
        return False
    return (tensor_val(node.args[0]).dtype, tensor_val(node).dtype) in _EXACT_WIDENINGS


def is_rounding_cast(node: Node) -> bool:
    """A float cast that can change values (fp32 -> bf16/fp16, bf16 <-> fp16, ...). It keeps
    their order only weakly: distinct values may round to one."""
    if not is_float_cast(node):
        return False
    src, dst = tensor_val(node.args[0]).dtype, tensor_val(node).dtype
    return src != dst and (src, dst) not in _EXACT_WIDENINGS


def is_value_preserving(node: Node) -> bool:
    """Ops whose output holds the input's values rearranged (views, copies, float casts)."""
    if not isinstance(node, Node) or node.op != "call_function":
        return False
    if node.target in RESHAPES or node.target in IDENTITIES or node.target in PERMUTES \
            or node.target in EXPANDS:
        return isinstance(node.args[0], Node) and tensor_val(node.args[0]) is not None
    return is_float_cast(node)


def input_dims(space: LabelSpace, node: Node, out_dims: Dims) -> Dims:
    """Labels of the (single) tensor input of a value-preserving op whose output has out_dims."""
    source = node.args[0]
    in_shape = shape(source)
    target = node.target
    if target in RESHAPES:
        return space.through_reshape(out_dims, in_shape)
    if target in PERMUTES:
        rank = len(in_shape)
        if target == aten.permute.default:
            perm = list(node.args[1])
        elif target == aten.transpose.int:
            perm = list(range(rank))
            a, b = node.args[1] % max(rank, 1), node.args[2] % max(rank, 1)
            perm[a], perm[b] = perm[b], perm[a]
        else:
            perm = list(reversed(range(rank)))
        return space.through_permute(out_dims, perm)
    if target in EXPANDS:
        return space.through_broadcast(out_dims, in_shape)
    return list(out_dims)  # identities and casts


def scalar_value(x: Any, owner: Optional[torch.nn.Module] = None, depth: int = 0) -> Optional[float]:
    """The single value of a constant: a Python number, or a node that builds a constant tensor
    (scalar_tensor, full, full_like, a module constant, or copies/casts/views of those).
    None when the value is not known at compile time (a graph input, a computed tensor)."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if not isinstance(x, Node) or depth > 8:
        return None
    if x.op == "get_attr":
        module = owner if owner is not None else x.graph.owning_module
        if _is_state(module, x.target):
            return None  # a parameter or buffer can change after compile: not a constant
        tensor = _module_attr(module, x.target)
        # Only small constants are read: a large one is data, not a scale or a fill value.
        if isinstance(tensor, torch.Tensor) and 1 <= tensor.numel() <= 4096 \
                and not isinstance(tensor, torch._subclasses.FakeTensor):
            flat = tensor.detach().reshape(-1).double()
            if bool((flat == flat[0]).all()):
                return float(flat[0])
        return None
    if x.op != "call_function":
        return None
    target = x.target
    if target == aten.scalar_tensor.default:
        return scalar_value(x.args[0], owner, depth + 1)
    if target == aten.full.default:
        return scalar_value(x.args[1], owner, depth + 1)
    if target == aten.full_like.default:
        return scalar_value(x.args[1], owner, depth + 1)
    if target == aten.new_full.default:
        return scalar_value(x.args[2], owner, depth + 1)
    if target in (aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default):
        return 0.0
    if target in (aten.ones.default, aten.ones_like.default, aten.new_ones.default):
        return 1.0
    if is_value_preserving(x) or target in CASTS:
        return scalar_value(x.args[0], owner, depth + 1)
    return None


def _is_state(module: Optional[torch.nn.Module], target: str) -> bool:
    """Whether `target` names a registered parameter or buffer of `module` (or a submodule)."""
    *path, name = str(target).split(".")
    parent = _module_attr(module, ".".join(path)) if path else module
    if not isinstance(parent, torch.nn.Module):
        return False
    return name in parent._parameters or name in parent._buffers


def _module_attr(module: Optional[torch.nn.Module], target: str):
    obj: Any = module
    for part in str(target).split("."):
        if obj is None:
            return None
        obj = getattr(obj, part, None)
    return obj


def relu_input(node: Node) -> Optional[Node]:
    """The input of relu, or of an op provably identical to it: clamp_min(x, 0),
    clamp(x, 0, None), threshold(x, 0, 0), maximum(x, zeros) (NaN propagates through all of
    them alike). None for any other op."""
    target = node.target
    x = node.args[0] if node.args else None
    if target == aten.relu.default:
        return x
    if target == aten.clamp_min.default:
        return x if scalar_value(node.args[1]) == 0.0 else None
    if target == aten.clamp.default:
        return x if scalar_value(arg(node, 1, "min")) == 0.0 and arg(node, 2, "max") is None \
            else None
    if target == aten.threshold.default:
        return x if scalar_value(node.args[1]) == 0.0 and scalar_value(node.args[2]) == 0.0 \
            else None
    if target == aten.maximum.default:
        for value, zero in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
            same_shape = tensor_val(value) is not None \
                and tuple(tensor_val(value).shape) == tuple(tensor_val(node).shape)
            if same_shape and scalar_value(zero) == 0.0:
                return value
    return None


# torch.export's checks of a tensor's dtype/shape/device: they read a tensor's metadata, never its
# values, and check a tensor the rewrite removes, so they go with it.
METADATA_CHECKS = {aten._assert_tensor_metadata.default}

# Ops that read only the shape, dtype or device of their tensor input, never its values.
SHAPE_READERS = {aten.full_like.default, aten.zeros_like.default, aten.ones_like.default,
                 aten.empty_like.default, aten.new_full.default, aten.new_zeros.default,
                 aten.new_ones.default, aten.new_empty.default}


def getitem_users(node: Node) -> dict[int, list[Node]]:
    """Users of a multi-output node, by output index; raises if a user is not a getitem."""
    outputs: dict[int, list[Node]] = {}
    for user in node.users:
        if user.op != "call_function" or user.target is not operator.getitem:
            raise LayoutError(f"{node.name} is used by {user.name} as a tuple")
        outputs.setdefault(user.args[1], []).append(user)
    return outputs
