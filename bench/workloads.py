"""Inputs, baselines and measures shared by the GPU check and the benchmark.

- make_inputs: random bf16 q [B,S,H,D], k [B,T,D] and signed w [B,S,H] (never zeros).
- quantize_fp8: DeepSeek-style FP8 e4m3 q / k with per-(token, head) query and per-token key
  scales (amax / 448).
- hf_indexer_topk: the indexer as the Hugging Face DeepSeek-V3.2 model writes it (fp32 matmul
  of q against the shared key, ReLU, a matmul with the per-head weights, mask, topk), run over
  query chunks so that its [chunk, H, T] fp32 logits fit in memory. torch.compile of the same
  chunk function is the compiled baseline.
- true_scores: exact fp32 index scores of given (query, key) pairs, for checking selections by
  the scores they gathered (never by index order).
- recall: mean |S' ∩ S| / |S| over queries, counting the finite entries of S, chunked."""
from __future__ import annotations

from typing import Optional

import torch

from misa_compile.kernels import torch_impl


def make_inputs(batch: int, queries: int, keys: int, heads: int = 64, dim: int = 128,
                dtype=torch.bfloat16, seed: int = 0, device: str = "cuda"):
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, queries, heads, dim, generator=gen, device=device).to(dtype)
    k = torch.randn(batch, keys, dim, generator=gen, device=device).to(dtype)
    w = (torch.randn(batch, queries, heads, generator=gen, device=device) * heads ** -0.5).to(dtype)
    return q, k, w


def quantize_fp8(q, k):
    """(q8, k8, q_scale [B,S,H], k_scale [B,T]): q ~ q8 * q_scale, k ~ k8 * k_scale."""
    fp8 = torch.float8_e4m3fn
    q_scale = q.float().abs().amax(-1).clamp_min(1e-6) / torch.finfo(fp8).max
    k_scale = k.float().abs().amax(-1).clamp_min(1e-6) / torch.finfo(fp8).max
    q8 = (q.float() / q_scale[..., None]).to(fp8)
    k8 = (k.float() / k_scale[..., None]).to(fp8)
    return q8, k8, q_scale, k_scale


def _hf_chunk(q, k, w, first_visible_end, k_top: int, scale: float):
    """One chunk of queries, written like the Hugging Face model. first_visible_end: tensor
    [c], the exclusive end of each query's visible keys (end-aligned causal)."""
    scores = torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1)) * scale
    scores = torch.relu(scores)
    index_scores = torch.matmul(w.float().unsqueeze(-2), scores).squeeze(-2)
    positions = torch.arange(k.shape[1], device=k.device)
    visible = positions[None, None, :] < first_visible_end[None, :, None]
    index_scores = index_scores.masked_fill(~visible, float("-inf"))
    return index_scores.topk(k_top, dim=-1)


_compiled_chunk = None


def hf_indexer_topk(q, k, w, k_top: int, scale: float = 1.0, chunk: int = 256,
                    compiled: bool = False):
    """Top-k indices [B, S, K] of the end-aligned causal indexer, chunk queries at a time."""
    global _compiled_chunk
    fn = _hf_chunk
    if compiled:
        if _compiled_chunk is None:
            _compiled_chunk = torch.compile(_hf_chunk, dynamic=False)
        fn = _compiled_chunk
    batch, queries = q.shape[:2]
    T = k.shape[1]
    K = min(k_top, T)
    out = torch.empty(batch, queries, K, dtype=torch.int64, device=q.device)
    for row0 in range(0, queries, chunk):
        rows = slice(row0, min(row0 + chunk, queries))
        ends = T - queries + torch.arange(rows.start, rows.stop, device=q.device) + 1
        out[:, rows] = fn(q[:, rows], k, w[:, rows], ends, K, scale)[1]
    return out


def true_scores(q, k, w, indices, scale: float = 1.0, heads: Optional[torch.Tensor] = None,
                chunk: int = 128):
    """fp32 [B, S, n] index scores of keys `indices` [B, S, n] (clamped into range), summed
    over all heads or over the routed heads."""
    if heads is not None:
        q, w = torch_impl.gather_heads(q, w, heads)
    batch, queries = q.shape[:2]
    out = torch.empty(indices.shape, dtype=torch.float32, device=q.device)
    idx = indices.long().clamp(0, k.shape[1] - 1)
    for b in range(batch):
        for row0 in range(0, queries, chunk):
            rows = slice(row0, min(row0 + chunk, queries))
            keys = k[b].float()[idx[b, rows]]  # [c, n, D]
            logits = torch.einsum("chd,cnd->chn", q[b, rows].float(), keys).relu_()
            out[b, rows] = torch.einsum("chn,ch->cn", logits, w[b, rows].float()) * scale
    return out


def recall(selected, selected_values, truth, truth_values, chunk: int = 1024) -> float:
    """Mean over queries of |selected ∩ truth| / |truth| (finite entries only; 1 for empty)."""
    total, count = 0.0, 0
    keys = int(max(selected.max(), truth.max())) + 2
    flat_s = selected.reshape(-1, selected.shape[-1])
    flat_sv = selected_values.reshape(flat_s.shape)
    flat_t = truth.reshape(-1, truth.shape[-1])
    flat_tv = truth_values.reshape(flat_t.shape)
    for row0 in range(0, flat_s.shape[0], chunk):
        rows = slice(row0, row0 + chunk)
        member = torch.zeros(flat_s[rows].shape[0], keys, dtype=torch.bool, device=selected.device)
        member.scatter_(1, torch.where(torch.isfinite(flat_sv[rows]), flat_s[rows], keys - 1), True)
        member[:, keys - 1] = False
        finite = torch.isfinite(flat_tv[rows])
        hits = (member.gather(1, flat_t[rows]) & finite).sum(1).double()
        size = finite.sum(1).double()
        total += torch.where(size > 0, hits / size.clamp_min(1), torch.ones_like(size)).sum().item()
        count += size.numel()
    return total / max(1, count)


def visible_pairs(batch: int, queries: int, keys: int) -> int:
    """(query, key) pairs visible under end-aligned causality."""
    first = keys - queries + 1
    return batch * (queries * first + queries * (queries - 1) // 2)
