"""Plain torch references of every algorithm in ALGORITHM.md. They materialise the whole [B, S, T]
score matrix in float64: slow and memory-hungry on purpose, so that they stay obviously correct.
The ops' implementations (chunked torch on CPU, Triton on GPU) are tested against them.

Layout: q [B, S, H, D], k [B, T, D], w [B, S, H]. Visibility: see visibility.py. Outputs follow
torch.topk(..., dim=-1): (values, int64 indices) of shape [B, S, min(k_top, T)]. Rows with fewer
than k_top visible keys end in -inf values whose indices point at hidden keys: ignore those.
NaN scores rank below every key (they are turned into -inf), so a NaN never displaces a real key.
q_scale [B, S, H] / k_scale [B, T] (optional): the math runs on q * q_scale[..., None] and
k * k_scale[..., None] (dequantized FP8 inputs), in float64."""
from __future__ import annotations

import torch

from .visibility import block_visibility, chunk_visibility, pooled_keys

NEG_INF = float("-inf")


def dequantized(q, k, q_scale=None, k_scale=None):
    """float64 real values of q and k: x.double() * scale[..., None] (scale None = 1)."""
    q, k = q.double(), k.double()
    if q_scale is not None:
        q = q * q_scale.double()[..., None]
    if k_scale is not None:
        k = k * k_scale.double()[..., None]
    return q, k


def reference_visibility(q, k, causal=True, key_start=None, key_end=None, mask=None):
    """(visible bool [B,S,T], additive bias or None) for all queries."""
    batch, queries = q.shape[:2]
    return chunk_visibility(slice(None), batch, queries, k.shape[1], q.device, causal,
                            key_start, key_end, mask)


def dense_scores(q, k, w, scale=1.0, causal=True, key_start=None, key_end=None, mask=None,
                 q_scale=None, k_scale=None):
    """I[b,t,s] = scale * sum_j w[b,t,j] * ReLU(q[b,t,j] . k[b,s]) (+ additive mask), -inf where
    hidden; float64 [B, S, T]."""
    q, k = dequantized(q, k, q_scale, k_scale)
    logits = torch.einsum("bthd,bsd->bths", q.double(), k.double())
    scores = (w.double()[..., None] * logits.relu()).sum(2) * scale
    return _apply_visibility(scores, q, k, causal, key_start, key_end, mask)


def dense_topk(q, k, w, k_top, scale=1.0, causal=True, key_start=None, key_end=None, mask=None,
               q_scale=None, k_scale=None):
    scores = dense_scores(q, k, w, scale, causal, key_start, key_end, mask, q_scale, k_scale)
    return _topk(scores, k_top)


def router_scores(q, k, w, block_size, causal=True, key_start=None, key_end=None, mask=None,
                  q_scale=None, k_scale=None):
    """r[b,t,j] = |w[b,t,j]| * sum over visible blocks of ReLU(q[b,t,j] . kbar[b,blk]); float64."""
    q, k = dequantized(q, k, q_scale, k_scale)
    kbar = pooled_keys(k, block_size).double()
    visible, _ = reference_visibility(q, k, causal, key_start, key_end, mask)
    block_visible = block_visibility(visible, block_size)  # [B, S, nb]
    per_block = torch.einsum("bthd,bnd->bthn", q.double(), kbar).relu()
    per_block = per_block * block_visible[:, :, None, :]
    return w.double().abs() * per_block.sum(-1)


def route_heads(q, k, w, active_heads, block_size, causal=True, key_start=None, key_end=None,
                mask=None, router="score", q_scale=None, k_scale=None):
    """The h active heads of every query: int64 [B, S, h] (order unspecified)."""
    q, k = dequantized(q, k, q_scale, k_scale)
    if router == "qnorm":
        r = q.double().norm(dim=-1)
    else:
        r = router_scores(q, k, w, block_size, causal, key_start, key_end, mask)
    return torch.nan_to_num(r, nan=NEG_INF).topk(active_heads, dim=-1).indices


def routed_scores(q, k, w, heads, scale=1.0, causal=True, key_start=None, key_end=None,
                  mask=None, q_scale=None, k_scale=None):
    """I'[b,t,s] = scale * sum_{j in heads[b,t]} w[b,t,j] * ReLU(q[b,t,j] . k[b,s]), written as
    the dense formula with non-routed heads' weights zeroed (a different spelling from the ops')."""
    keep = torch.zeros(w.shape, dtype=torch.bool, device=w.device).scatter_(-1, heads, True)
    w_routed = torch.where(keep, w.double(), torch.zeros((), dtype=torch.float64))
    return dense_scores(q, k, w_routed, scale, causal, key_start, key_end, mask, q_scale, k_scale)


def misa_topk(q, k, w, k_top, active_heads=8, block_size=1024, scale=1.0, causal=True,
              key_start=None, key_end=None, mask=None, router="score", q_scale=None,
              k_scale=None):
    q, k = dequantized(q, k, q_scale, k_scale)
    heads = route_heads(q, k, w, active_heads, block_size, causal, key_start, key_end, mask, router)
    scores = routed_scores(q, k, w, heads, scale, causal, key_start, key_end, mask)
    return _topk(scores, k_top)


def misa_hier_topk(q, k, w, k_top, active_heads=8, block_size=1024, candidates=8192, scale=1.0,
                   causal=True, key_start=None, key_end=None, mask=None, router="score",
                   q_scale=None, k_scale=None):
    """Routed top-n_cand candidates, then the exact H-head score restricted to them."""
    q, k = dequantized(q, k, q_scale, k_scale)
    _, cand = misa_topk(q, k, w, candidates, active_heads, block_size, scale, causal, key_start,
                        key_end, mask, router)
    return _topk_within(dense_scores(q, k, w, scale, causal, key_start, key_end, mask), cand, k_top)


def hisa_topk(q, k, w, k_top, block_size=128, num_blocks=64, scale=1.0, causal=True,
              key_start=None, key_end=None, mask=None, q_scale=None, k_scale=None):
    """HISA: keep the first and own (last visible) block plus the top-m blocks by the all-head
    signed block score, then the exact H-head score inside the kept blocks."""
    q, k = dequantized(q, k, q_scale, k_scale)
    kbar = pooled_keys(k, block_size).double()
    visible, _ = reference_visibility(q, k, causal, key_start, key_end, mask)
    block_visible = block_visibility(visible, block_size)
    beta = (w.double()[..., None] * torch.einsum("bthd,bnd->bthn", q.double(), kbar).relu()).sum(2)
    beta = torch.nan_to_num(beta, nan=NEG_INF).masked_fill(~block_visible, NEG_INF)
    beta = _force_first_and_last(beta, block_visible)
    kept_blocks = beta.topk(min(num_blocks, beta.shape[-1]), dim=-1).indices
    keys = k.shape[1]
    kept_keys = torch.zeros(beta.shape[:2] + (keys,), dtype=torch.bool, device=q.device)
    block_of_key = torch.arange(keys, device=q.device) // block_size
    for slot in range(kept_blocks.shape[-1]):
        kept_keys |= block_of_key == kept_blocks[..., slot:slot + 1]
    scores = dense_scores(q, k, w, scale, causal, key_start, key_end, mask)
    return _topk(scores.masked_fill(~kept_keys, NEG_INF), k_top)


def _force_first_and_last(beta, block_visible):
    nb = block_visible.shape[-1]
    first = block_visible.int().argmax(-1, keepdim=True)
    last = nb - 1 - block_visible.flip(-1).int().argmax(-1, keepdim=True)
    any_visible = block_visible.any(-1, keepdim=True)
    forced = torch.where(any_visible, torch.full_like(beta[..., :1], float("inf")),
                         torch.full_like(beta[..., :1], NEG_INF))
    return beta.scatter(-1, first, forced).scatter(-1, last, forced)


def _apply_visibility(scores, q, k, causal, key_start, key_end, mask):
    visible, bias = reference_visibility(q, k, causal, key_start, key_end, mask)
    if bias is not None:
        scores = scores + bias.double()
    scores = torch.nan_to_num(scores, nan=NEG_INF)
    return scores.masked_fill(~visible, NEG_INF)


def _topk(scores, k_top):
    return scores.topk(min(k_top, scores.shape[-1]), dim=-1)


def _topk_within(scores, candidates, k_top):
    allowed = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    allowed.scatter_(-1, candidates, True)
    return _topk(scores.masked_fill(~allowed, NEG_INF), k_top)


def selection_recall(selected: torch.Tensor, selected_values: torch.Tensor,
                     dense: torch.Tensor, dense_values: torch.Tensor) -> torch.Tensor:
    """Per-query recall |S' ∩ S| / |S| counting only visible (finite-score) keys of the dense
    selection S. Indices [B, S, k]; returns float64 [B, S] (1.0 where S is empty)."""
    keys = int(max(selected.max(), dense.max())) + 1
    chosen = _finite_set(selected, selected_values, keys)
    truth = _finite_set(dense, dense_values, keys)
    hits = (chosen & truth).sum(-1).double()
    total = truth.sum(-1).double()
    return torch.where(total > 0, hits / total.clamp_min(1), torch.ones_like(total))


def _finite_set(indices, values, keys):
    # Non-finite entries are sent to an extra dummy column, so repeated tail indices never
    # overwrite a real member.
    member = torch.zeros(indices.shape[:-1] + (keys + 1,), dtype=torch.bool, device=indices.device)
    slots = torch.where(torch.isfinite(values), indices.long(), keys)
    return member.scatter_(-1, slots, True)[..., :keys]
