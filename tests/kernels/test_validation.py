"""Bad inputs to the misa ops fail at the call with an error naming the op, the argument and the
allowed range; NaN and infinite inputs follow the documented policy (docs/ops.md)."""
from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from misa_compile import MisaConfig, indexer_topk

from .strategies import PROPERTY_SETTINGS, indexer_problems, naive_visibility

ops = torch.ops.misa
B, S, T, H, D = 2, 3, 7, 4, 5
OP_NAMES = ("dense_topk", "route_heads", "routed_topk", "rerank_topk", "hisa_candidates")
VARIANTS = ("dense", "misa", "misa_hier", "hisa")
# A device other than the CPU: a GPU when there is one, else "meta" (tensors without data, which
# still dispatch as a different device).
OTHER_DEVICE = "cuda" if torch.cuda.is_available() else "meta"


def _site(batch=B, queries=S, keys=T, heads=H, dim=D, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(batch, queries, heads, dim, generator=gen).to(dtype),
            torch.randn(batch, keys, dim, generator=gen).to(dtype),
            torch.randn(batch, queries, heads, generator=gen).to(dtype))


def _call(name, q, k, w, **overrides):
    """Calls op `name` with valid op-specific arguments, replaced by `overrides`."""
    batch, queries = q.shape[:2]
    defaults = {
        "dense_topk": dict(k_top=2),
        "route_heads": dict(active_heads=2, block_size=3),
        "routed_topk": dict(heads=torch.zeros(batch, queries, 1, dtype=torch.int64), k_top=2),
        "rerank_topk": dict(candidates=torch.zeros(batch, queries, 3, dtype=torch.int64),
                            k_top=2),
        "hisa_candidates": dict(block_size=2, num_blocks=2),
    }[name]
    return getattr(ops, name)(q, k, w, **{**defaults, **overrides})


def _raises(error, *fragments):
    """pytest.raises matching every fragment of the message literally, in order."""
    return pytest.raises(error, match=".*".join(re.escape(f) for f in fragments))


# --- inputs every op checks -------------------------------------------------------------------

def _bad_layouts():
    q, k, w = _site()
    return {
        "k batch": ((q, torch.randn(B + 1, T, D), w), ValueError,
                    ("k has shape (3, 7, 5)", "[B=2, T, D=5]")),
        "k dim": ((q, torch.randn(B, T, D + 1), w), ValueError, ("k has shape", "D=5]")),
        "w heads": ((q, k, torch.randn(B, S, H + 1)), ValueError,
                    ("w has shape (2, 3, 5)", "expected [B, S, H] = [2, 3, 4]")),
        "w queries": ((q, k, torch.randn(B, S + 1, H)), ValueError,
                      ("w has shape (2, 4, 4)", "[2, 3, 4]")),
        "q rank": ((q[..., 0], k, w), ValueError, ("q must have layout [B, S, H, D]",)),
        "k rank": ((q, k[0], w), ValueError, ("k must have layout [B, T, D]",)),
        "q int": ((q.long(), k, w), TypeError,
                  ("q has dtype torch.int64", "allowed dtypes are torch.float32")),
        "k float64": ((q, k.double(), w), TypeError,
                      ("k has dtype torch.float64", "allowed dtypes are")),
        "w int": ((q, k, w.int()), TypeError, ("w has dtype torch.int32",)),
        "empty S": (_site(queries=0), ValueError, ("empty input, S=0", ">= 1")),
        "empty T": (_site(keys=0), ValueError, ("empty input, T=0", ">= 1")),
        "empty H": (_site(heads=0), ValueError, ("empty input, H=0",)),
        "empty B": (_site(batch=0), ValueError, ("empty input, B=0",)),
        "empty D": (_site(dim=0), ValueError, ("empty input, D=0",)),
    }


@pytest.mark.parametrize("case", list(_bad_layouts()))
@pytest.mark.parametrize("name", OP_NAMES)
def test_bad_layout_is_named(name, case):
    (q, k, w), error, fragments = _bad_layouts()[case]
    if q.shape[1] == 0 or q.shape[0] == 0:
        # Op arguments shaped like q must be empty too, so that only the emptiness is wrong.
        with _raises(error, f"misa.{name}", *fragments):
            getattr(ops, name)(q, k, w, *_empty_op_args(name, q))
        return
    with _raises(error, f"misa.{name}", *fragments):
        _call(name, q, k, w)


def _empty_op_args(name, q):
    index = torch.zeros(q.shape[0], q.shape[1], 1, dtype=torch.int64)
    return {"dense_topk": (2,), "route_heads": (1, 3), "routed_topk": (index, 2),
            "rerank_topk": (index, 2), "hisa_candidates": (2, 2)}[name]


def _bad_visibility():
    ks = torch.zeros(B, S, dtype=torch.int64)
    return {
        "start without end": (dict(key_start=ks), ValueError,
                              ("key_start and key_end must be given together",)),
        "end without start": (dict(key_end=ks + T), ValueError,
                              ("key_start and key_end must be given together",)),
        "float key range": (dict(key_start=ks.float(), key_end=ks.float() + T), TypeError,
                            ("key_start has dtype torch.float32", "allowed: int32, int64")),
        "key range shape": (dict(key_start=ks[:, :1], key_end=ks[:, :1] + T), ValueError,
                            ("key_start has shape (2, 1)", "expected [B, S] = [2, 3]")),
        "mask shape": (dict(mask=torch.ones(B, S, T + 1, dtype=torch.bool)), ValueError,
                       ("mask has shape (2, 3, 8)", "expected [B, S, T] = [2, 3, 7]")),
        "mask int": (dict(mask=torch.ones(B, S, T, dtype=torch.int64)), TypeError,
                     ("mask has dtype torch.int64", "allowed: bool (True = visible)",
                      "float dtype")),
        "mask float64": (dict(mask=torch.zeros(B, S, T, dtype=torch.float64)), TypeError,
                         ("mask has dtype torch.float64",)),
    }


@pytest.mark.parametrize("case", list(_bad_visibility()))
@pytest.mark.parametrize("name", OP_NAMES)
def test_bad_visibility_argument_is_named(name, case):
    kwargs, error, fragments = _bad_visibility()[case]
    with _raises(error, f"misa.{name}", *fragments):
        _call(name, *_site(), **kwargs)


INDEX_ARGUMENT = {"routed_topk": "heads", "rerank_topk": "candidates"}
MOVED_INPUTS = [(name, moved) for name in OP_NAMES
                for moved in ("q", "k", "w", "key_start", "mask", INDEX_ARGUMENT.get(name)) if moved]


@pytest.mark.parametrize("name, moved", MOVED_INPUTS)
def test_mixed_devices_are_refused(name, moved):
    q, k, w = _site()
    tensors = dict(q=q, k=k, w=w)
    if moved == "key_start":
        tensors.update(key_start=torch.zeros(B, S, dtype=torch.int64),
                       key_end=torch.full((B, S), T))
    elif moved == "mask":
        tensors.update(mask=torch.ones(B, S, T, dtype=torch.bool))
    elif moved in ("heads", "candidates"):
        tensors[moved] = torch.zeros(B, S, 2, dtype=torch.int64)
    tensors[moved] = tensors[moved].to(OTHER_DEVICE)
    device_of_q = tensors["q"].device
    other = "k" if moved == "q" else moved
    with _raises(ValueError, f"misa.{name}", f"{other} is on", f"q is on {device_of_q}",
                 "one device"):
        _call(name, **tensors)


# --- op-specific arguments ----------------------------------------------------------------------

def _bad_op_arguments():
    heads = torch.zeros(B, S, 2, dtype=torch.int64)
    return [
        ("route_heads", dict(active_heads=0), ValueError, ("active_heads=0", "[1, 4]")),
        ("route_heads", dict(active_heads=H + 1), ValueError, ("active_heads=5", "[1, 4]")),
        ("route_heads", dict(block_size=0), ValueError, ("block_size=0", ">= 1")),
        ("route_heads", dict(router="norm"), ValueError, ("router='norm'", "'score', 'qnorm'")),
        ("hisa_candidates", dict(block_size=0), ValueError, ("block_size=0", ">= 1")),
        ("hisa_candidates", dict(num_blocks=0), ValueError, ("num_blocks=0", ">= 1")),
        ("dense_topk", dict(k_top=0), ValueError, ("k_top=0", ">= 1")),
        ("routed_topk", dict(k_top=0), ValueError, ("k_top=0", ">= 1")),
        ("rerank_topk", dict(k_top=-1), ValueError, ("k_top=-1", ">= 1")),
        ("routed_topk", dict(heads=heads - 1), ValueError, ("heads must lie in [0, H) = [0, 4)",)),
        ("routed_topk", dict(heads=heads + H), ValueError, ("heads must lie in [0, H) = [0, 4)",)),
        ("routed_topk", dict(heads=heads.float()), TypeError,
         ("heads has dtype torch.float32", "int32, int64")),
        ("routed_topk", dict(heads=heads[:, :1]), ValueError,
         ("heads has shape (2, 1, 2)", "[B=2, S=3, n>=1]")),
        ("routed_topk", dict(heads=heads[..., :0]), ValueError, ("heads has shape (2, 3, 0)",)),
        ("rerank_topk", dict(candidates=heads.float()), TypeError,
         ("candidates has dtype torch.float32",)),
        ("rerank_topk", dict(candidates=heads[:1]), ValueError,
         ("candidates has shape (1, 3, 2)", "[B=2, S=3, n>=1]")),
    ] + [(name, dict(scale=scale), ValueError, (f"scale={scale}", "finite number > 0"))
         for name in ("dense_topk", "routed_topk", "rerank_topk")
         for scale in (0.0, -1.0, math.inf, math.nan)]


@pytest.mark.parametrize("name, overrides, error, fragments", _bad_op_arguments())
def test_bad_op_argument_is_named(name, overrides, error, fragments):
    with _raises(error, f"misa.{name}", *fragments):
        _call(name, *_site(), **overrides)


def test_indexer_topk_checks_the_config_against_the_site():
    q, k, w = _site()
    with _raises(ValueError, "MisaConfig.active_heads=5", "[1, H] = [1, 4]"):
        indexer_topk(q, k, w, 2, MisaConfig(active_heads=H + 1))
    with _raises(ValueError, "MisaConfig.candidates=3", "k_top=4"):
        indexer_topk(q, k, w, 4, MisaConfig(variant="misa_hier", active_heads=2, candidates=3))


# --- NaN and infinity ----------------------------------------------------------------------------

def _poisoned(problem, seed, value):
    """A copy of the problem's keys with about a third of the key rows set to `value`."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.rand(problem.batch, problem.keys, 1, generator=gen) < 0.35
    return rows[..., 0], torch.where(rows, value, problem.k)


def _config(problem, variant):
    return MisaConfig(variant=variant, active_heads=problem.active_heads,
                      block_size=problem.block_size, candidates=problem.k_top + 2,
                      hisa_block=problem.hisa_block, hisa_blocks=2)


@PROPERTY_SETTINGS
@given(problem=indexer_problems(), variant=st.sampled_from(VARIANTS), seed=st.integers(0, 999))
def test_nan_key_ranks_below_every_visible_key(problem, variant, seed):
    """A key whose score is NaN is treated like a hidden key: never selected, and a query that
    sees k_top finite keys still gets k_top of them (HISA: within its kept blocks)."""
    nan_rows, k = _poisoned(problem, seed, math.nan)
    problem = problem.with_inputs(k=k)
    vis = problem.visibility()
    values, indices = indexer_topk(problem.q, k, problem.w, problem.k_top,
                                   _config(problem, variant), **vis)
    assert not values.isnan().any()
    finite_visible = naive_visibility(problem) & ~nan_rows[:, None, :]
    chosen = values.isfinite()
    assert finite_visible.gather(-1, indices)[chosen].all(), "a NaN or hidden key was selected"
    if variant == "hisa":
        kept = ops.hisa_candidates(problem.q, k, problem.w, problem.hisa_block, 2, **vis)
        in_blocks = torch.zeros(finite_visible.shape[:-1] + (problem.keys + 1,), dtype=torch.bool)
        in_blocks.scatter_(-1, torch.where(kept >= 0, kept, problem.keys), True)
        finite_visible &= in_blocks[..., :problem.keys]
    assert torch.equal(chosen.sum(-1), finite_visible.sum(-1).clamp(max=problem.k_top))


@PROPERTY_SETTINGS
@given(problem=indexer_problems(), seed=st.integers(0, 999),
       value=st.sampled_from((math.inf, -math.inf)), where=st.sampled_from(("q", "k", "w")))
def test_infinite_inputs_do_not_crash(problem, seed, value, where):
    gen = torch.Generator().manual_seed(seed)
    tensor = getattr(problem, where)
    poisoned = torch.where(torch.rand(tensor.shape, generator=gen) < 0.3, value, tensor)
    problem = problem.with_inputs(**{where: poisoned})
    q, k, w, vis = problem.q, problem.k, problem.w, problem.visibility()
    for variant in VARIANTS:
        values, indices = indexer_topk(q, k, w, problem.k_top, _config(problem, variant), **vis)
        assert not values.isnan().any(), variant
        assert ((indices >= 0) & (indices < problem.keys)).all(), variant
    heads = ops.route_heads(q, k, w, problem.active_heads, problem.block_size, **vis)
    assert ((heads >= 0) & (heads < problem.heads)).all()
    assert all(len(set(row.tolist())) == problem.active_heads
               for row in heads.reshape(-1, problem.active_heads))


def test_infinite_scores_rank_first_and_last_among_visible_keys():
    """Scores of +inf and -inf are clamped to the largest finite float32 values: they rank
    first and last among the visible keys, and -inf in an output only ever marks a slot with no
    visible key."""
    q = torch.ones(1, 2, 2, 3)
    w = torch.tensor([[[1.0, 1.0], [-1.0, -1.0]]])  # query 0 adds the logits, query 1 subtracts
    k = torch.ones(1, 6, 3)
    k[0, 4] = math.inf
    largest = torch.finfo(torch.float32).max
    values, indices = ops.dense_topk(q, k, w, 6, causal=False)
    assert indices[0, 0, 0] == 4 and values[0, 0, 0] == largest
    assert indices[0, 1, -1] == 4 and values[0, 1, -1] == -largest
    assert values.isfinite().all()
    first_three = (torch.arange(6) < 3).expand(1, 2, 6)
    values, indices = ops.dense_topk(q, k, w, 6, causal=False, mask=first_three)
    assert 4 not in indices[values.isfinite()].tolist()
