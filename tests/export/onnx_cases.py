"""Indexer programs made of misa ops, their inputs, and the checks shared by the export tests.

`AllOps` calls every misa op once on its own inputs (route_heads with both routers, routed_topk on
given heads, rerank_topk on given candidates) and then every MisaConfig variant of the site
(dense, misa, misa with the q-norm router, misa with all heads, misa_hier, hisa), so one ONNX
export covers every translation. Inputs come in one of five visibility kinds, matching the ops'
arguments: end-aligned causal, ragged key ranges, a bool mask, an additive mask (with -inf, NaN,
values at the HIDDEN_BIAS threshold and just above it), or everything visible.

Ties are the one freedom a translation has (ONNX breaks them toward lower indices, torch leaves
them unspecified), so: each op's own outputs are checked on signed data (ReLU active, exact-zero
scores common) with tie-aware comparisons, and the chained variants, where a tie in an early stage
(router, candidates) changes everything after it, on positive q and k (q . k > 0, no ties)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import torch
from torch import Tensor, nn

from misa_compile import MisaConfig, indexer_topk
from misa_compile.kernels import reference
from misa_compile.kernels.visibility import HIDDEN_BIAS, block_visibility, pooled_keys

VISIBILITY_KINDS = ("causal", "ragged", "bool_mask", "additive_mask", "all_visible")
HEADS, DIM, K_TOP, SCALE = 4, 8, 6, 0.7
ACTIVE_HEADS, ROUTER_BLOCK, HISA_BLOCK, HISA_BLOCKS = 2, 4, 4, 2

# Small blocks and candidate counts so that short key axes exercise every padding path
# (T < k_top, T < candidates, fewer key blocks than hisa_blocks).
VARIANTS = {
    "dense": MisaConfig("dense"),
    "misa": MisaConfig("misa", active_heads=ACTIVE_HEADS, block_size=ROUTER_BLOCK),
    "misa_qnorm": MisaConfig("misa", active_heads=ACTIVE_HEADS, block_size=ROUTER_BLOCK,
                             router="qnorm"),
    "misa_all_heads": MisaConfig("misa", active_heads=HEADS, block_size=ROUTER_BLOCK),
    "misa_hier": MisaConfig("misa_hier", active_heads=ACTIVE_HEADS, block_size=ROUTER_BLOCK,
                            candidates=8),
    "hisa": MisaConfig("hisa", hisa_block=HISA_BLOCK, hisa_blocks=HISA_BLOCKS),
}
OP_OUTPUTS = ("dense_topk", "route_heads", "route_heads_qnorm", "routed_topk", "rerank_topk",
              "hisa_candidates")


def visibility_names(kind: str) -> tuple[str, ...]:
    """The forward arguments, after q, k, w, heads, candidates, that carry visibility of `kind`."""
    return {"ragged": ("key_start", "key_end"), "bool_mask": ("mask",),
            "additive_mask": ("mask",)}.get(kind, ())


CAUSAL_KINDS = ("causal", "bool_mask")


def visible_sizes(kind: str, queries: int, keys: int) -> tuple[int, int]:
    """(queries, keys) valid for `kind`: end-aligned causal visibility needs T >= S."""
    return queries, max(keys, queries) if kind in CAUSAL_KINDS else keys


def visibility_kwargs(kind: str, visibility: tuple[Tensor, ...]) -> dict:
    given = dict(zip(visibility_names(kind), visibility))
    return dict(causal=kind in CAUSAL_KINDS, key_start=given.get("key_start"),
                key_end=given.get("key_end"), mask=given.get("mask"))


class AllOps(nn.Module):
    """forward(q, k, w, heads, candidates, *visibility) -> a dict of outputs: each op of
    OP_OUTPUTS on its own, then (values, indices) of every variant in `variants`."""

    def __init__(self, kind: str, variants: dict[str, MisaConfig] = VARIANTS):
        super().__init__()
        self.kind = kind
        self.variants = variants

    def forward(self, q: Tensor, k: Tensor, w: Tensor, heads: Tensor, candidates: Tensor,
                *visibility: Tensor) -> dict[str, tuple[Tensor, ...]]:
        vis = visibility_kwargs(self.kind, visibility)
        ops = torch.ops.misa
        outputs = {
            "dense_topk": ops.dense_topk(q, k, w, K_TOP, SCALE, **vis),
            "route_heads": (ops.route_heads(q, k, w, ACTIVE_HEADS, ROUTER_BLOCK, "score",
                                           **vis),),
            "route_heads_qnorm": (ops.route_heads(q, k, w, ACTIVE_HEADS, ROUTER_BLOCK, "qnorm",
                                                 **vis),),
            "routed_topk": ops.routed_topk(q, k, w, heads, K_TOP, SCALE, **vis),
            "rerank_topk": ops.rerank_topk(q, k, w, candidates, K_TOP, SCALE, **vis),
            "hisa_candidates": (ops.hisa_candidates(q, k, w, HISA_BLOCK, HISA_BLOCKS, **vis),),
        }
        for name, config in self.variants.items():
            outputs[name] = indexer_topk(q, k, w, K_TOP, config, scale=SCALE, **vis)
        return outputs


def make_inputs(kind: str, batch: int, queries: int, keys: int, seed: int,
                positive: bool = False) -> tuple[Tensor, ...]:
    """(q, k, w, heads, candidates, *visibility). `positive` draws q, k >= 0 (no ties anywhere);
    otherwise q . k is signed and ReLU zeroes about half of it. heads are distinct routed heads;
    candidates are distinct key ids in [-1, T] (so some are invalid), up to 5 per query."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator)

    q, k, w = normal(batch, queries, HEADS, DIM), normal(batch, keys, DIM), normal(batch, queries,
                                                                                   HEADS)
    if positive:
        q, k = q.abs(), k.abs()
    heads = torch.rand(batch, queries, HEADS, generator=generator).argsort(-1)[..., :ACTIVE_HEADS]
    width = min(5, keys + 2)
    candidates = torch.rand(batch, queries, keys + 2, generator=generator).argsort(-1)
    candidates = candidates[..., :width] - 1
    extra: tuple[Tensor, ...] = ()
    if kind == "ragged":
        start = torch.randint(0, keys, (batch, queries), generator=generator)
        length = torch.randint(0, keys + 1, (batch, queries), generator=generator)
        extra = (start, torch.minimum(start + length, torch.tensor(keys)))
    elif kind == "bool_mask":
        extra = (torch.rand(batch, queries, keys, generator=generator) > 0.3,)
    elif kind == "additive_mask":
        bias = normal(batch, queries, keys)
        pick = torch.rand(batch, queries, keys, generator=generator)
        bias = torch.where(pick < 0.15, float("-inf"), bias)
        bias = torch.where((pick >= 0.15) & (pick < 0.25), HIDDEN_BIAS, bias)  # hidden: at the bar
        bias = torch.where((pick >= 0.25) & (pick < 0.3), HIDDEN_BIAS / 2, bias)  # visible, low
        bias = torch.where((pick >= 0.3) & (pick < 0.33), float("nan"), bias)
        extra = (bias,)
    return (q, k, w, heads, candidates, *extra)


def dynamic_shapes(kind: str) -> tuple:
    """Batch, query, key and candidate axes dynamic, with readable ONNX axis names."""
    batch, queries, keys, cands = (torch.export.Dim("batch"), torch.export.Dim("queries"),
                                   torch.export.Dim("keys"), torch.export.Dim("cands"))
    per_query = {0: batch, 1: queries}
    visibility = tuple({0: batch, 1: queries, 2: keys} if name == "mask" else per_query
                       for name in visibility_names(kind))
    # The visibility tensors arrive through *visibility: torch.export wants them as one tuple.
    return ((per_query, {0: batch, 1: keys}, per_query, per_query,
             {0: batch, 1: queries, 2: cands}) + ((visibility,) if visibility else ()))


def ops_program(kind: str, example: tuple[Tensor, ...], dynamic: bool,
                variants: dict[str, MisaConfig] = VARIANTS) -> torch.export.ExportedProgram:
    """AllOps exported as it is (its misa ops are already there: no rewrite needed)."""
    shapes = dynamic_shapes(kind) if dynamic else None
    program = torch.export.export(AllOps(kind, variants), example, dynamic_shapes=shapes)
    return program.run_decompositions()


def unflatten(outputs: list[Tensor], variants: dict[str, MisaConfig] = VARIANTS
              ) -> dict[str, tuple[Tensor, ...]]:
    """The ONNX model's flat outputs, named as AllOps' dict (flattened in insertion order)."""
    sizes = {"route_heads": 1, "route_heads_qnorm": 1, "hisa_candidates": 1}
    named, position = {}, 0
    for name in OP_OUTPUTS + tuple(variants):
        size = sizes.get(name, 2)
        named[name] = tuple(outputs[position:position + size])
        position += size
    assert position == len(outputs), (position, len(outputs))
    return named


class OnnxRunner:
    """One ONNX Runtime session (CPU provider, two threads) for a model."""

    def __init__(self, model: onnx.ModelProto):
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 2
        self.session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                                    providers=["CPUExecutionProvider"])

    def __call__(self, *inputs: Tensor) -> list[Tensor]:
        names = [i.name for i in self.session.get_inputs()]
        feeds = {name: t.numpy() for name, t in zip(names, inputs)}
        return [torch.from_numpy(np.asarray(out)) for out in self.session.run(None, feeds)]


def assert_same_selection(got_values: Tensor, got_indices: Tensor, want_values: Tensor,
                          want_indices: Tensor, keys: int, atol: float = 1e-4,
                          label: str = "") -> None:
    """Two top-k selections agree: same shape, indices in [0, keys), the same sorted scores, and
    the same SET of entries above the row's selection boundary (+inf entries included). Entries
    tied (within atol) with the boundary may differ: ONNX breaks ties toward lower indices, torch
    leaves them unspecified."""
    assert got_values.shape == want_values.shape, (label, got_values.shape, want_values.shape)
    assert got_indices.shape == want_indices.shape, (label, got_indices.shape)
    if got_indices.numel():
        assert 0 <= int(got_indices.min()) and int(got_indices.max()) < keys, label
    sorted_got = got_values.double().sort(-1, descending=True).values
    sorted_want = want_values.double().sort(-1, descending=True).values
    torch.testing.assert_close(sorted_got, sorted_want, rtol=1e-5, atol=atol, msg=label)
    got_rows = got_indices.reshape(-1, got_indices.shape[-1])
    want_rows = want_indices.reshape(-1, want_indices.shape[-1])
    got_vals = got_values.reshape(got_rows.shape)
    want_vals = want_values.reshape(want_rows.shape)
    for row in range(want_rows.shape[0]):
        finite = want_vals[row][torch.isfinite(want_vals[row])]
        boundary = float(finite.min()) + atol if finite.numel() else float("inf")

        def above(indices: Tensor, values: Tensor) -> set[int]:
            return set(indices[(values > boundary) | (values == float("inf"))].tolist())

        assert above(got_rows[row], got_vals[row]) == above(want_rows[row], want_vals[row]), \
            (label, row, got_rows[row], want_rows[row])


def assert_same_heads(got: Tensor, want: Tensor, router_scores: Tensor, label: str) -> None:
    """Routed heads agree as sets, up to ties in the float64 router scores."""
    assert_same_selection(router_scores.gather(-1, got), got, router_scores.gather(-1, want), want,
                          keys=HEADS, label=label)


def hisa_block_scores(q: Tensor, k: Tensor, w: Tensor, causal: bool, key_start, key_end,
                      mask) -> Tensor:
    """float64 [B,S,nb] HISA block scores as the block filter ranks them: -inf for hidden
    blocks, +inf for the always-kept first and last visible block."""
    visible, _ = reference.reference_visibility(q, k, causal, key_start, key_end, mask)
    blocks_visible = block_visibility(visible, HISA_BLOCK)
    kbar = pooled_keys(k, HISA_BLOCK).double()
    per_block = torch.einsum("bshd,bnd->bshn", q.double(), kbar).relu()
    beta = (w.double()[..., None] * per_block).sum(2).masked_fill(~blocks_visible, float("-inf"))
    ids = torch.arange(blocks_visible.shape[-1])
    first = torch.where(blocks_visible, ids, ids.numel()).amin(-1, keepdim=True)
    last = torch.where(blocks_visible, ids, -1).amax(-1, keepdim=True)
    return beta.masked_fill((ids == first) | (ids == last), float("inf"))


def assert_same_hisa_candidates(got: Tensor, want: Tensor, block_scores: Tensor, keys: int,
                                label: str) -> None:
    """Same kept blocks (up to ties in the block scores), each expanded to its key ids with -1
    past the last key."""
    assert got.shape == want.shape, (label, got.shape, want.shape)
    batch, queries, width = got.shape
    if HISA_BLOCKS * HISA_BLOCK >= keys:
        # Every block is kept: the candidates are every key, in order (never padded past T).
        every_key = torch.arange(keys).expand(batch, queries, keys)
        assert torch.equal(got, every_key) and torch.equal(want, every_key), label
        return
    got_blocks = got.view(batch, queries, width // HISA_BLOCK, HISA_BLOCK)[..., 0] // HISA_BLOCK
    want_blocks = want.view(got_blocks.shape + (HISA_BLOCK,))[..., 0] // HISA_BLOCK
    key_ids = got_blocks[..., None] * HISA_BLOCK + torch.arange(HISA_BLOCK)
    expected = torch.where(key_ids < keys, key_ids, -1).flatten(-2)
    assert torch.equal(got, expected), label
    num_blocks = block_scores.shape[-1]
    assert_same_selection(block_scores.gather(-1, got_blocks), got_blocks,
                          block_scores.gather(-1, want_blocks), want_blocks, keys=num_blocks,
                          label=label)
