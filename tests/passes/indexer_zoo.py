"""DSA lightning indexers written in many spellings, planted in host models next to unrelated
matmuls and unrelated top-ks, for testing the detector and the rewrite.

An `IndexerSpec` names one choice per axis (how q.k is contracted, how heads are reduced, where the
positive scale sits, which dtypes and casts, which mask, which layout, which outputs are used);
`ZooIndexer` computes that spelling. A spec with `negative` set plants a near-miss that is NOT a DSA
indexer (or cannot be proven one): it must be refused with the reason in `NEGATIVE_REASONS`, or,
where that reason is None, at least never rewritten. A DSA indexer whose top-k values are used
under a bias in UNPROVEN_BIAS_MASKS must be refused too (`expected_reason`).
`HostModel` embeds several sites plus decoys (an MoE gate top-k over experts, a top-k sparse code of
a ReLU'd projection) that must never be rewritten.

Every positive site can also hand out its q [B,S,H,D], k [B,T,D], w [B,S,H], its total positive
scale and its key visibility, so tests compare against kernels/reference.py, which is written
independently of the spellings here."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from misa_compile.kernels import reference

QK_FORMS = ("einsum", "matmul", "matmul_keys_first", "bmm_heads", "bmm_queries",
            "expanded_keys", "mul_sum")
HEAD_SUMS = ("mul_sum", "matmul_weights", "einsum", "mean")
SCALES = ("none", "before_relu", "divide_before_relu", "after_relu", "weights", "query", "hf",
          "negated_weights")
RELU_FORMS = ("relu", "clamp_min", "relu_inplace", "threshold", "maximum")
WEIGHT_FNS = ("linear", "softmax", "sigmoid")
DTYPES = ("fp32", "bf16_upcast", "bf16_mixed", "fp16_upcast", "bf16")
MASKS = ("none", "additive_inf", "additive_finfo", "bool_masked_fill", "bool_where", "tril",
         "arange", "triu_additive", "key_padding", "causal_and_keep", "two_masks", "alibi_add",
         "one_minus_keep", "alibi_sub", "where_full_like")
LAYOUTS = ("batch", "flat")
# How q reaches the contraction after its projection: as is, through a heads-first round trip
# (DeepSeek-V4 applies RoPE to [.., H, S, D] and transposes back), or flattened to [.., S, H*D]
# and split again.
Q_VIEWS = ("none", "heads_first", "flattened")
OUTPUTS = ("indices", "values", "both", "getitem", "int32", "positive_dim")
ALIBI_SLOPE = 0.05

# Near-misses and the reason code the report must give for each.
NEGATIVE_REASONS = {
    "negative_scale": "negative_scale",        # ReLU(-c * q.k): the sign flips the selection
    "unknown_scale": "unknown_scale",          # learned temperature of unknown sign before ReLU
    "gelu": "not_relu",
    "silu": "not_relu",
    "per_head_keys": "per_head_keys",          # k [B,T,H,D]: not the shared-key MQA layout
    "sum_over_queries": "reduction_not_over_heads",
    "topk_over_queries": "topk_not_key_axis",
    "smallest_topk": "smallest_topk",
    "scores_returned": "scores_used_elsewhere",
    "fill_with_zero": "unknown_mask",          # masked_fill(~keep, 0): hidden keys can still win
    # Not DSA, and any refusal (or none: not recognised as indexer-like) is acceptable; only a
    # rewrite is wrong.
    "key_dependent_weights": None,             # w * sigmoid(per-key gate): weights vary by key
    "mask_inside_head_sum": None,              # per-head scores zeroed (not hidden) before the sum
    "bias_before_relu": None,                  # ReLU(q.k + b_h)
    "relu_after_weights": None,                # ReLU(w * q.k): the weight sign enters the ReLU
    "relu_after_sum": None,                    # ReLU(sum_h w * q.k)
    "amax_over_heads": None,                   # max over heads instead of the weighted sum
}

# Masks whose visibility comes from the host's `keep` input; the rest are causal (end-aligned)
# built inside the graph, or absent.
INPUT_MASKS = ("additive_inf", "additive_finfo", "bool_masked_fill", "bool_where",
               "fill_with_zero", "causal_and_keep", "two_masks", "one_minus_keep",
               "where_full_like")
IN_GRAPH_MASKS = ("tril", "arange", "triu_additive", "alibi_add", "alibi_sub")
# Additive biases the pass cannot prove hide keys only with -inf: read from an input (any value at
# run time), finfo.min, or a float recency slope the mask algebra does not evaluate. With the top-k
# values used, a hidden key's value is eager's finite score + bias but -inf in the ops, so such a
# site is refused (unknown_mask); with only the indices used it is rewritten.
UNPROVEN_BIAS_MASKS = ("additive_inf", "additive_finfo", "key_padding", "one_minus_keep",
                       "two_masks", "alibi_add", "alibi_sub")
# The near-miss name negative_specs draws for such a site (its `negative` stays None).
VALUES_UNDER_UNPROVEN_BIAS = "values_under_unproven_bias"

_PARAM_DTYPE = {"fp32": torch.float32, "bf16_upcast": torch.bfloat16,
                "bf16_mixed": torch.bfloat16, "fp16_upcast": torch.float16,
                "bf16": torch.bfloat16}


@dataclass(frozen=True)
class IndexerSpec:
    qk: str = "einsum"
    head_sum: str = "mul_sum"
    scale: str = "none"
    dtype: str = "fp32"
    mask: str = "none"
    layout: str = "batch"
    outputs: str = "indices"
    relu: str = "relu"
    weights_fn: str = "linear"
    q_view: str = "none"
    heads: int = 4
    dim: int = 8
    k_top: int = 5
    negative: Optional[str] = None

    def __post_init__(self) -> None:
        for name, allowed in (("qk", QK_FORMS), ("head_sum", HEAD_SUMS), ("scale", SCALES),
                              ("dtype", DTYPES), ("layout", LAYOUTS), ("outputs", OUTPUTS),
                              ("relu", RELU_FORMS), ("weights_fn", WEIGHT_FNS),
                              ("q_view", Q_VIEWS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"IndexerSpec.{name}={getattr(self, name)!r}: allowed {allowed}")
        if self.mask not in MASKS + ("fill_with_zero",):
            raise ValueError(f"IndexerSpec.mask={self.mask!r}: allowed {MASKS}")
        if self.negative is not None and self.negative not in NEGATIVE_REASONS:
            raise ValueError(f"IndexerSpec.negative={self.negative!r}: allowed "
                             f"{tuple(NEGATIVE_REASONS)}")

    @property
    def expected_reason(self) -> Optional[str]:
        """The reason the report must give for this site, None if it is rewritten or a near-miss
        whose refusal reason is free."""
        if self.negative is not None:
            return NEGATIVE_REASONS[self.negative]
        if self.outputs in ("values", "both") and self.mask in UNPROVEN_BIAS_MASKS:
            return "unknown_mask"
        return None

    @property
    def rewritten(self) -> bool:
        """Whether the pass must rewrite this site (else it is refused or not reported)."""
        return self.negative is None and self.expected_reason is None

    @property
    def output_names(self) -> tuple[str, ...]:
        """What the site returns, in order: "indices", "values" or "scores"."""
        if self.negative == "scores_returned":
            return ("indices", "scores")
        if self.negative is not None or self.outputs in ("indices", "getitem", "int32",
                                                          "positive_dim"):
            return ("indices",)
        return ("values",) if self.outputs == "values" else ("values", "indices")

    @property
    def positive_scale(self) -> float:
        """Product of the positive factors the spelling applies to the score (the reference's
        `scale`). "negated_weights" multiplies w by -1/sqrt(H); that sign belongs to the weights,
        so it is applied to w in `reference_inputs`, not here."""
        d_scale, h_scale = self.dim ** -0.5, self.heads ** -0.5
        mean = 1.0 / self.heads if self.head_sum == "mean" else 1.0
        return mean * {"none": 1.0, "before_relu": d_scale, "divide_before_relu": d_scale,
                       "after_relu": d_scale, "weights": h_scale, "query": d_scale,
                       "hf": d_scale * h_scale, "negated_weights": h_scale}[self.scale]


@dataclass(frozen=True)
class HostSpec:
    """A host model: its sites (all with the same head count), its layout, and whether the
    unrelated MoE and sparse-code top-ks are there."""
    sites: tuple[IndexerSpec, ...]
    layout: str = "batch"
    embed: int = 16
    decoys: bool = True

    @property
    def positives(self) -> tuple[IndexerSpec, ...]:
        return tuple(s for s in self.sites if s.rewritten)

    @property
    def negatives(self) -> tuple[IndexerSpec, ...]:
        return tuple(s for s in self.sites if not s.rewritten)


# ---------------------------------------------------------------------------------------------
# The pieces of a spelling. Batch layout: q [B,S,H,D], k [B,T,D], w [B,S,H].
# Flat token layout: q [S,H,D], k [T,D], w [S,H] (tokens of all sequences side by side).

def _contract(q: Tensor, k: Tensor, form: str, flat: bool) -> Tensor:
    """q.k over D for every (query, head, key). Head axis before the key axis, except
    "matmul_keys_first", which yields [..., S, T, H]."""
    if flat:
        s, h, d = q.shape
        t = k.shape[0]
        if form == "einsum":
            return torch.einsum("shd,td->sht", q, k)
        if form == "matmul":
            return q @ k.T
        if form == "matmul_keys_first":
            return k @ q.transpose(1, 2)
        if form == "bmm_heads":
            return (q.reshape(s * h, d) @ k.T).view(s, h, t)
        if form == "expanded_keys":
            return torch.einsum("shd,thd->sht", q, k[:, None, :].expand(t, h, d))
        if form == "mul_sum":
            return (q[:, :, None, :] * k[None, None, :, :]).sum(dim=-1)
        return torch.bmm(q, k.T.expand(s, d, t))
    b, s, h, d = q.shape
    t = k.shape[1]
    if form == "einsum":
        return torch.einsum("bshd,btd->bsht", q, k)
    if form == "matmul":
        return torch.matmul(q, k.transpose(-1, -2).unsqueeze(1))
    if form == "matmul_keys_first":
        return torch.matmul(k.unsqueeze(1), q.transpose(-1, -2))
    if form == "bmm_heads":
        return torch.bmm(q.reshape(b, s * h, d), k.transpose(1, 2)).view(b, s, h, t)
    if form == "expanded_keys":
        # MLA-style: one key broadcast to every head, contracted as if keys were per head.
        return torch.einsum("bshd,bthd->bsht", q, k[:, :, None, :].expand(b, t, h, d))
    if form == "mul_sum":
        return (q[:, :, :, None, :] * k[:, None, None, :, :]).sum(dim=-1)
    per_query_keys = k.unsqueeze(1).expand(b, s, t, d).reshape(b * s, t, d).transpose(1, 2)
    return torch.bmm(q.reshape(b * s, h, d), per_query_keys).view(b, s, h, t)


def _reduce_heads(scores: Tensor, w: Tensor, form: str, keys_first: bool) -> Tensor:
    """sum_j w[..., j] * scores[..., j, :] (or [..., :, j] when the head axis is last)."""
    if form in ("mul_sum", "mean"):
        weighted = scores * (w.unsqueeze(-2) if keys_first else w[..., None])
        dim = -1 if keys_first else -2
        return weighted.sum(dim=dim) if form == "mul_sum" else weighted.mean(dim=dim)
    if form == "matmul_weights":
        if keys_first:
            return torch.matmul(scores, w.unsqueeze(-1)).squeeze(-1)
        return torch.matmul(w.unsqueeze(-2), scores).squeeze(-2)
    return torch.einsum("...th,...h->...t" if keys_first else "...ht,...h->...t", scores, w)


def _activation(logits: Tensor, negative: Optional[str], relu: str) -> Tensor:
    if negative == "gelu":
        return F.gelu(logits)
    if negative == "silu":
        return F.silu(logits)
    if relu == "clamp_min":
        return logits.clamp(min=0)
    if relu == "relu_inplace":
        return logits.relu_()
    if relu == "threshold":
        return F.threshold(logits, 0.0, 0.0)
    if relu == "maximum":
        return torch.maximum(logits, torch.zeros_like(logits))
    return F.relu(logits)


def _alibi_distance(queries: int, keys: int, device: torch.device) -> Tensor:
    """query position - key position, end-aligned (query i is token keys - queries + i)."""
    query_pos = torch.arange(queries, device=device) + (keys - queries)
    return query_pos[:, None] - torch.arange(keys, device=device)[None, :]


def _mask(scores: Tensor, kind: str, keep: Tensor, bias_inf: Tensor, bias_min: Tensor) -> Tensor:
    """Hide the keys a query may not see. `keep` (True = visible), `bias_inf` (0 / -inf) and
    `bias_min` (0 / finfo(float32).min) are host inputs of shape [..., S, T]."""
    queries, keys = scores.shape[-2], scores.shape[-1]
    if kind == "none":
        return scores
    if kind == "additive_inf":
        return scores + bias_inf.to(scores.dtype)
    if kind == "additive_finfo":
        return scores + bias_min.to(scores.dtype)
    if kind == "bool_masked_fill":
        return scores.masked_fill(~keep, float("-inf"))
    if kind == "bool_where":
        return torch.where(keep, scores, float("-inf"))
    if kind == "fill_with_zero":
        return scores.masked_fill(~keep, 0.0)
    if kind == "key_padding":
        # The last query sees every key that is not padding: a [.., 1, T] padding mask.
        return scores + bias_inf[..., -1:, :].to(scores.dtype)
    if kind == "causal_and_keep":
        causal = torch.ones(queries, keys, dtype=torch.bool, device=scores.device)
        return scores.masked_fill(~(causal.tril(diagonal=keys - queries) & keep), float("-inf"))
    if kind == "one_minus_keep":
        # The older Hugging Face spelling: (1 - mask) * finfo.min, added.
        return scores + (1.0 - keep.to(scores.dtype)) * torch.finfo(scores.dtype).min
    if kind == "where_full_like":
        return torch.where(keep, scores, torch.full_like(scores, float("-inf")))
    if kind in ("alibi_add", "alibi_sub"):
        # A finite recency bias (not a mask) plus causality.
        distance = _alibi_distance(queries, keys, scores.device)
        if kind == "alibi_add":
            scores = scores + (-ALIBI_SLOPE * distance).to(scores.dtype)
        else:
            scores = scores - (ALIBI_SLOPE * distance).to(scores.dtype)
        return scores.masked_fill(distance < 0, float("-inf"))
    if kind == "two_masks":
        causal = torch.ones(queries, keys, dtype=torch.bool, device=scores.device)
        scores = scores + bias_min.to(scores.dtype)
        return scores.masked_fill(~causal.tril(diagonal=keys - queries), float("-inf"))
    if kind == "tril":
        causal = torch.ones(queries, keys, dtype=torch.bool, device=scores.device)
        return scores.masked_fill(~causal.tril(diagonal=keys - queries), float("-inf"))
    if kind == "arange":
        key_pos = torch.arange(keys, device=scores.device)
        last_visible = torch.arange(queries, device=scores.device) + (keys - queries)
        return torch.where(key_pos[None, :] <= last_visible[:, None], scores, float("-inf"))
    # "triu_additive", the DeepSeek reference code's way: -inf strictly above the diagonal.
    hidden = torch.full((queries, keys), float("-inf"), device=scores.device)
    return scores + hidden.triu(keys - queries + 1).to(scores.dtype)


class ZooIndexer(nn.Module):
    """One indexer site spelled as `spec` says. forward(x [.., S, E], ctx [.., T, E], keep,
    bias_inf, bias_min) returns the tuple of outputs the spec uses."""

    def __init__(self, spec: IndexerSpec, embed: int):
        super().__init__()
        self.spec = spec
        dtype = _PARAM_DTYPE[spec.dtype]
        key_width = spec.heads * spec.dim if spec.negative == "per_head_keys" else spec.dim
        self.wq = nn.Linear(embed, spec.heads * spec.dim, bias=False, dtype=dtype)
        self.wk = nn.Linear(embed, key_width, bias=False, dtype=dtype)
        # The head weights are computed in float32 for the upcasting spellings, as HF does.
        w_dtype = torch.float32 if spec.dtype.endswith("_upcast") else dtype
        self.weights_proj = nn.Linear(embed, spec.heads, bias=False, dtype=w_dtype)
        if spec.negative == "unknown_scale":
            self.temperature = nn.Parameter(torch.tensor(0.7))
        if spec.negative == "key_dependent_weights":
            self.key_gate = nn.Linear(embed, 1, dtype=dtype)
        if spec.negative == "bias_before_relu":
            self.head_bias = nn.Parameter(0.3 * torch.randn(spec.heads, 1, dtype=dtype))

    def project(self, x: Tensor, ctx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [.., S, H, D], k [.., T, D] (or [.., T, H, D] for per-head keys), w [.., S, H] in the
        parameters' dtypes."""
        spec = self.spec
        q = self.wq(x.to(self.wq.weight.dtype))
        q = q.view(*q.shape[:-1], spec.heads, spec.dim)
        k = self.wk(ctx.to(self.wk.weight.dtype))
        if spec.negative == "per_head_keys":
            k = k.view(*k.shape[:-1], spec.heads, spec.dim)
        w = self.weights_proj(x.to(self.weights_proj.weight.dtype))
        if spec.weights_fn == "softmax":
            w = w.softmax(dim=-1)
        elif spec.weights_fn == "sigmoid":
            w = w.sigmoid()
        return q, k, w

    def index_scores(self, x: Tensor, ctx: Tensor, keep: Tensor, bias_inf: Tensor,
                     bias_min: Tensor) -> Tensor:
        spec = self.spec
        flat = spec.layout == "flat"
        q, k, w = self.project(x, ctx)
        if spec.dtype.endswith("_upcast"):
            q, k = q.float(), k.float()
        if spec.q_view == "heads_first":
            q = q.transpose(-3, -2).contiguous().transpose(-3, -2)
        elif spec.q_view == "flattened":
            q = q.flatten(-2).unflatten(-1, (spec.heads, spec.dim))
        if spec.scale == "query":
            q = q * spec.dim ** -0.5
        if spec.negative == "per_head_keys":
            logits = torch.einsum("bshd,bthd->bsht", q, k)
        else:
            logits = _contract(q, k, spec.qk, flat)
        if spec.dtype == "bf16_mixed":
            # bf16 matmul, the rest in float32: a cast between the contraction and the ReLU.
            logits, w = logits.float(), w.float()
        if spec.scale in ("before_relu", "hf"):
            logits = logits * spec.dim ** -0.5
        elif spec.scale == "divide_before_relu":
            logits = logits / math.sqrt(spec.dim)
        if spec.negative == "negative_scale":
            logits = logits * -(spec.dim ** -0.5)
        elif spec.negative == "unknown_scale":
            logits = logits * self.temperature.to(logits.dtype)
        elif spec.negative == "bias_before_relu":
            logits = logits + self.head_bias
        if spec.scale in ("weights", "hf"):
            w = w * spec.heads ** -0.5
        elif spec.scale == "negated_weights":
            w = w * -(spec.heads ** -0.5)
        if spec.negative in ("relu_after_weights", "relu_after_sum"):
            weighted = logits * w[..., None]
            if spec.negative == "relu_after_weights":
                return weighted.relu().sum(dim=2)
            return weighted.sum(dim=2).relu()
        scores = _activation(logits, spec.negative, spec.relu)
        if spec.negative == "sum_over_queries":
            # [B,S,H,T] summed over S instead of H: a well-formed tensor, not an index score.
            return (scores * w[..., None]).sum(dim=1)
        if spec.negative == "amax_over_heads":
            return (scores * w[..., None]).amax(dim=2)
        if spec.negative == "mask_inside_head_sum":
            scores = scores.masked_fill(~keep[:, :, None, :], 0.0)
        if spec.negative == "key_dependent_weights":
            gate = self.key_gate(ctx.to(self.key_gate.weight.dtype)).sigmoid().squeeze(-1)
            w = w[..., None] * gate[:, None, None, :]
            return (scores * w).sum(dim=2)
        index = _reduce_heads(scores, w, spec.head_sum, spec.qk == "matmul_keys_first")
        if spec.scale == "after_relu":
            index = index * spec.dim ** -0.5
        return _mask(index, spec.mask, keep, bias_inf, bias_min)

    def forward(self, x: Tensor, ctx: Tensor, keep: Tensor, bias_inf: Tensor,
                bias_min: Tensor) -> tuple[Tensor, ...]:
        spec = self.spec
        scores = self.index_scores(x, ctx, keep, bias_inf, bias_min)
        if spec.negative == "topk_over_queries":
            return (scores.topk(spec.k_top, dim=-2).indices,)
        if spec.negative == "smallest_topk":
            return (scores.topk(spec.k_top, dim=-1, largest=False).indices,)
        if spec.negative == "scores_returned":
            return (scores.topk(spec.k_top, dim=-1).indices, scores)
        if spec.outputs == "indices":
            return (scores.topk(spec.k_top, dim=-1).indices,)
        if spec.outputs == "getitem":
            return (scores.topk(spec.k_top)[1],)
        if spec.outputs == "int32":
            return (scores.topk(spec.k_top, dim=-1).indices.to(torch.int32),)
        if spec.outputs == "positive_dim":
            return (torch.topk(scores, spec.k_top, dim=scores.dim() - 1).indices,)
        if spec.outputs == "values":
            return (torch.topk(scores, spec.k_top, dim=-1)[0],)
        values, indices = torch.topk(scores, spec.k_top, dim=-1, sorted=False)
        return (values, indices)

    # -- what the tests compare against --------------------------------------------------------

    def reference_inputs(self, x: Tensor, ctx: Tensor) -> tuple[Tensor, Tensor, Tensor, float]:
        """(q [B,S,H,D], k [B,T,D], w [B,S,H], positive scale): the indexer this site computes,
        in the ops' batch layout (a flat site is one batch of S queries)."""
        if self.spec.negative is not None:
            raise ValueError(f"a {self.spec.negative!r} site is not a DSA indexer")
        with torch.no_grad():
            q, k, w = self.project(x, ctx)
        w = w.float()
        if self.spec.scale == "negated_weights":
            w = -w
        if self.spec.layout == "flat":
            q, k, w = q[None], k[None], w[None]
        return q.float(), k.float(), w, self.spec.positive_scale

    def visibility(self, keep: Tensor) -> Tensor:
        """bool [B,S,T] (flat: [1,S,T]): keys this site's mask leaves visible."""
        keep = keep if keep.dim() == 3 else keep[None]
        if self.spec.mask in INPUT_MASKS:
            return keep
        if self.spec.mask == "key_padding":
            return keep[..., -1:, :].expand_as(keep)
        if self.spec.mask in IN_GRAPH_MASKS:
            queries, keys = keep.shape[-2:]
            causal = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)
            return causal.expand_as(keep)
        return torch.ones_like(keep)

    def reference_scores(self, x: Tensor, ctx: Tensor, keep: Tensor) -> Tensor:
        """float64 [B,S,T] index scores with -inf at hidden keys (kernels/reference.py)."""
        q, k, w, scale = self.reference_inputs(x, ctx)
        scores = reference.dense_scores(q, k, w, scale, causal=False, mask=self.visibility(keep))
        return scores + self.finite_bias(*scores.shape[-2:])

    def finite_bias(self, queries: int, keys: int) -> Tensor:
        """float64 [S,T] the spelling adds to visible scores (a recency bias), or zeros."""
        if self.spec.mask in ("alibi_add", "alibi_sub"):
            return -ALIBI_SLOPE * _alibi_distance(queries, keys, torch.device("cpu")).double()
        return torch.zeros(queries, keys, dtype=torch.float64)


class HostModel(nn.Module):
    """Sites plus unrelated work: a projection stem, a GELU MLP, an MoE layer whose gate takes a
    top-k over experts, and a top-k sparse code of a ReLU'd projection. Returns
    (unrelated output, *outputs of every site in order)."""

    def __init__(self, spec: HostSpec, experts: int = 4, codes: int = 12):
        super().__init__()
        embed = spec.embed
        self.spec = spec
        self.stem = nn.Linear(embed, embed)
        self.sites = nn.ModuleList(ZooIndexer(site, embed) for site in spec.sites)
        self.mlp = nn.Sequential(nn.Linear(embed, 2 * embed), nn.GELU(), nn.Linear(2 * embed, embed))
        self.gate = nn.Linear(embed, experts, bias=False)
        self.experts = nn.Parameter(torch.randn(experts, embed, embed) / math.sqrt(embed))
        self.encoder = nn.Linear(embed, codes)
        self.decoder = nn.Linear(codes, embed, bias=False)

    def forward(self, x: Tensor, ctx: Tensor, keep: Tensor, bias_inf: Tensor,
                bias_min: Tensor) -> tuple[Tensor, ...]:
        hx, hctx = self.stem(x), self.stem(ctx)
        outputs: list[Tensor] = []
        for site in self.sites:
            outputs.extend(site(hx, hctx, keep, bias_inf, bias_min))
        unrelated = self.mlp(hx)
        if self.spec.decoys:
            unrelated = unrelated + self._moe(hx) + self._sparse_code(hx)
        return (unrelated, *outputs)

    def _moe(self, h: Tensor) -> Tensor:
        gate_probs = self.gate(h).softmax(dim=-1)
        top_probs, top_experts = gate_probs.topk(2, dim=-1)
        every_expert = torch.einsum("...e,xef->...xf", h, self.experts)
        chosen = torch.gather(every_expert, -2,
                              top_experts[..., None].expand(*top_experts.shape, h.shape[-1]))
        return (chosen * top_probs[..., None]).sum(dim=-2)

    def _sparse_code(self, h: Tensor) -> Tensor:
        codes = F.relu(self.encoder(h))
        values, slots = codes.topk(2, dim=-1)
        return self.decoder(torch.zeros_like(codes).scatter(-1, slots, values))


# ---------------------------------------------------------------------------------------------
# Inputs

def make_inputs(host: HostSpec, queries: int, keys: int, batch: int = 2, seed: int = 0
                ) -> tuple[Tensor, ...]:
    """(x, ctx, keep, bias_inf, bias_min) for `host`. The queries are the last `queries` of the
    `keys` context tokens. `keep` is end-aligned causal AND, in batch layout, left padding of the
    second sequence; in flat layout, two packed sequences that do not see each other."""
    if not 1 <= queries <= keys:
        raise ValueError(f"queries={queries}: must be in [1, keys={keys}]")
    generator = torch.Generator().manual_seed(seed)
    flat = host.layout == "flat"
    lead = () if flat else (batch,)
    ctx = torch.randn(*lead, keys, host.embed, generator=generator)
    x = ctx[..., keys - queries:, :].clone()
    key_pos = torch.arange(keys)
    query_pos = torch.arange(queries) + (keys - queries)
    keep = key_pos[None, :] <= query_pos[:, None]
    if flat:
        same_sequence = (key_pos[None, :] >= keys // 2) == (query_pos[:, None] >= keys // 2)
        keep = keep & same_sequence
    else:
        padding = torch.tensor([0, 2])[:batch, None, None]
        keep = keep[None] & (key_pos[None, None, :] >= padding)
    bias_inf = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    bias_min = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    return x, ctx, keep, bias_inf, bias_min


def build_host(host: HostSpec, seed: int = 0) -> HostModel:
    torch.manual_seed(seed)
    return HostModel(host).eval()


def split_outputs(host: HostSpec, outputs: tuple[Tensor, ...]
                  ) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """(unrelated output, one {output name: tensor} per site) from a HostModel's outputs."""
    unrelated, rest = outputs[0], list(outputs[1:])
    per_site = []
    for spec in host.sites:
        names = spec.output_names
        per_site.append(dict(zip(names, rest[:len(names)])))
        rest = rest[len(names):]
    if rest:
        raise ValueError(f"{len(rest)} outputs left over after splitting by the host's sites")
    return unrelated, per_site


# ---------------------------------------------------------------------------------------------
# Hypothesis strategies

EXAMPLES_VARIABLE = "MISA_HYPOTHESIS_EXAMPLES"


def program_settings(ci_examples: int) -> settings:
    """CI's fixed budget, or MISA_HYPOTHESIS_EXAMPLES examples (`make test-long`). Examples are
    drawn afresh every run; a failure prints the falsifying example and a @reproduce_failure blob.
    Every compile resets Dynamo itself (the autouse reset fixture runs once per test, not per
    example), hence the silenced fixture health check."""
    examples = int(os.environ.get(EXAMPLES_VARIABLE, ci_examples))
    return settings(max_examples=examples, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])


seeds = st.integers(0, 2 ** 31 - 1)

def positive_specs(layout: str, heads: int, k_top: int) -> st.SearchStrategy[IndexerSpec]:
    """Indexers the matcher must find and rewrite, one choice per axis."""
    axes = {axis: st.sampled_from(values) for axis, values in AXES.items() if axis != "layout"}
    return st.builds(IndexerSpec, **axes, layout=st.just(layout), heads=st.just(heads),
                     dim=st.sampled_from((4, 8)),
                     k_top=st.just(k_top)).filter(lambda spec: spec.rewritten)


def negative_specs(heads: int, k_top: int) -> st.SearchStrategy[IndexerSpec]:
    """Near-misses in batch layout; masks are drawn only where the spelling keeps [B,S,T]."""
    def with_mask(negative: str) -> st.SearchStrategy[IndexerSpec]:
        if negative == VALUES_UNDER_UNPROVEN_BIAS:
            # A DSA indexer in any spelling, refused only for what its values would report.
            axes = {axis: st.sampled_from(values) for axis, values in AXES.items()
                    if axis not in ("layout", "mask", "outputs")}
            return st.builds(IndexerSpec, **axes, mask=st.sampled_from(UNPROVEN_BIAS_MASKS),
                             outputs=st.sampled_from(("values", "both")), heads=st.just(heads),
                             k_top=st.just(k_top))
        if negative in ("sum_over_queries", "mask_inside_head_sum"):
            masks = st.just("none")
        elif negative == "fill_with_zero":
            masks = st.just("fill_with_zero")
        else:
            masks = st.sampled_from(("none", "bool_masked_fill", "additive_inf", "tril"))
        qk = st.just("einsum") if negative == "per_head_keys" else st.sampled_from(
            ("einsum", "matmul"))
        # The rest of the spelling around the defect is drawn like a positive site's.
        return st.builds(IndexerSpec, qk=qk, mask=masks, heads=st.just(heads),
                         k_top=st.just(k_top), negative=st.just(negative),
                         scale=st.sampled_from(("none", "before_relu", "after_relu", "hf")),
                         dtype=st.sampled_from(("fp32", "bf16_upcast")),
                         relu=st.sampled_from(RELU_FORMS), q_view=st.sampled_from(Q_VIEWS))
    return st.sampled_from(sorted(NEGATIVE_REASONS) + [VALUES_UNDER_UNPROVEN_BIAS]).flatmap(
        with_mask)


@st.composite
def host_specs(draw, max_positive: int = 2, allow_negative: bool = True) -> HostSpec:
    """1..max_positive planted indexers (distinct k_top, so report records can be matched to
    sites) and, in batch layout, possibly one near-miss."""
    layout = draw(st.sampled_from(LAYOUTS))
    heads = draw(st.sampled_from((4, 8)))
    count = draw(st.integers(1, max_positive))
    sites = [draw(positive_specs(layout, heads, k_top=3 + i)) for i in range(count)]
    if allow_negative and layout == "batch" and draw(st.booleans()):
        sites.insert(draw(st.integers(0, count)), draw(negative_specs(heads, k_top=3 + count)))
    return HostSpec(sites=tuple(sites), layout=layout)


def single_site_host(spec: IndexerSpec, decoys: bool = True) -> HostSpec:
    return HostSpec(sites=(spec,), layout=spec.layout, decoys=decoys)


AXES = {"qk": QK_FORMS, "head_sum": HEAD_SUMS, "scale": SCALES, "dtype": DTYPES, "mask": MASKS,
        "layout": LAYOUTS, "outputs": OUTPUTS, "relu": RELU_FORMS, "weights_fn": WEIGHT_FNS,
        "q_view": Q_VIEWS}


SWEEP_SITES_PER_HOST = 7


def axis_sweep_hosts(axis: str) -> list[HostSpec]:
    """Hosts holding a site for every value of `axis`, the other axes at their defaults (a
    deterministic floor under the hypothesis search). At most SWEEP_SITES_PER_HOST sites a host,
    k_top 3, 4, ... telling them apart; the flat layout gets a host of its own."""
    if axis not in AXES:
        raise ValueError(f"axis={axis!r}: allowed {tuple(AXES)}")
    if axis == "layout":
        sites = (IndexerSpec(mask="bool_masked_fill", layout="flat", k_top=3),
                 IndexerSpec(mask="tril", layout="flat", outputs="both", k_top=4))
        return [HostSpec(sites=sites, layout="flat")]
    values = AXES[axis]
    chunks = [values[i:i + SWEEP_SITES_PER_HOST]
              for i in range(0, len(values), SWEEP_SITES_PER_HOST)]
    return [HostSpec(sites=tuple(IndexerSpec(**dict({"mask": "bool_masked_fill", axis: value}),
                                             k_top=3 + i) for i, value in enumerate(chunk)))
            for chunk in chunks]


def near_miss_hosts() -> list[HostSpec]:
    """Two hosts, each with one proven indexer (k_top=3) and near-misses (k_top 4, 5, ...): those
    with a required refusal reason (and an indexer whose values are used under an input bias),
    and those that only must not be rewritten. The query-axis top-k comes first, since its k must
    not exceed the query count."""
    masks = {"sum_over_queries": "none", "mask_inside_head_sum": "none",
             "fill_with_zero": "fill_with_zero"}
    hosts = []
    for strict in (True, False):
        negatives = sorted((n for n, reason in NEGATIVE_REASONS.items()
                            if (reason is not None) == strict),
                           key=lambda n: (n != "topk_over_queries", n))
        sites = [IndexerSpec(mask="tril", k_top=3)]
        sites += [IndexerSpec(negative=n, mask=masks.get(n, "bool_masked_fill"), k_top=4 + i)
                  for i, n in enumerate(negatives)]
        if strict:
            sites.append(IndexerSpec(mask="additive_finfo", outputs="both",
                                     k_top=4 + len(negatives)))
        hosts.append(HostSpec(sites=tuple(sites)))
    return hosts
