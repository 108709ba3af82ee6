"""Two hand-written DSA indexers in spellings other than Hugging Face's, each inside a small
attention block that consumes the selection. The graph pass must find both.

- `DeepSeekReferenceBlock`: the style of DeepSeek's own reference inference code: a key cache
  buffer written in place, einsum("bshd,btd->bsht"), in-place ReLU, weights pre-multiplied by
  H^-0.5 and the softmax scale and broadcast as [B,S,H,1], sum over dim=2, an additive causal mask
  built with triu_, topk(dim=-1)[1]; the attention then adds a -inf/0 index mask built by scatter.
- `PackedSparseAttentionBlock`: a GLM-5-like indexer (32 heads) in the flat token layout serving
  stacks use: tokens of several sequences packed along one axis, per-token key ranges
  [key_start, key_end), a head-first einsum("mhd,nd->hmn") in float32 from bf16 inputs, weights
  transposed to [H,M,1] and summed over dim=0; the attention gathers the selected keys.

Their weights come from the global torch RNG: seed it (torch.manual_seed) before building one."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DeepSeekReferenceIndexer(nn.Module):
    def __init__(self, dim: int, n_heads: int, head_dim: int, index_topk: int,
                 max_batch_size: int = 4, max_seq_len: int = 256):
        super().__init__()
        self.n_heads, self.head_dim, self.index_topk = n_heads, head_dim, index_topk
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, head_dim, bias=False)
        self.k_norm = nn.LayerNorm(head_dim)
        self.weights_proj = nn.Linear(dim, n_heads, bias=False)
        self.softmax_scale = head_dim ** -0.5
        self.register_buffer("k_cache", torch.zeros(max_batch_size, max_seq_len, head_dim),
                             persistent=False)

    def forward(self, x: Tensor, start_pos: int, mask: Tensor | None) -> Tensor:
        bsz, seqlen, _ = x.size()
        end_pos = start_pos + seqlen
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.k_norm(self.wk(x))
        self.k_cache[:bsz, start_pos:end_pos] = k
        weights = self.weights_proj(x) * self.n_heads ** -0.5
        weights = weights.unsqueeze(-1) * self.softmax_scale
        index_score = torch.einsum("bshd,btd->bsht", q, self.k_cache[:bsz, :end_pos])
        index_score = (index_score.relu_() * weights).sum(dim=2)
        if mask is not None:
            index_score += mask
        return index_score.topk(min(self.index_topk, end_pos), dim=-1)[1]


class DeepSeekReferenceBlock(nn.Module):
    """Pre-norm attention block whose heads attend only to the indexer's selected keys.
    forward(x [B,S,dim]) -> [B,S,dim]."""

    def __init__(self, dim: int = 32, n_heads: int = 4, head_dim: int = 8, index_n_heads: int = 16,
                 index_head_dim: int = 16, index_topk: int = 8):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.norm = nn.RMSNorm(dim)
        self.indexer = DeepSeekReferenceIndexer(dim, index_n_heads, index_head_dim, index_topk)
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wkv = nn.Linear(dim, 2 * n_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.start_pos = 0

    def forward(self, x: Tensor) -> Tensor:
        bsz, seqlen, _ = x.size()
        h = self.norm(x)
        mask = (torch.full((seqlen, seqlen), float("-inf"), device=x.device).triu_(1)
                if seqlen > 1 else None)
        topk_indices = self.indexer(h, self.start_pos, mask)
        q = self.wq(h).view(bsz, seqlen, self.n_heads, self.head_dim)
        k, v = self.wkv(h).view(bsz, seqlen, 2, self.n_heads, self.head_dim).unbind(2)
        scores = torch.einsum("bshd,bthd->bsht", q, k) * self.head_dim ** -0.5
        index_mask = torch.full((bsz, seqlen, seqlen), float("-inf"), device=x.device)
        index_mask = index_mask.scatter_(-1, topk_indices, 0)
        if mask is not None:
            index_mask += mask
        scores += index_mask.unsqueeze(2)
        probs = scores.softmax(dim=-1)
        out = torch.einsum("bsht,bthd->bshd", probs, v)
        return x + self.wo(out.flatten(2))

    @staticmethod
    def example_inputs(batch: int = 2, seqlen: int = 24, dim: int = 32, seed: int = 0
                       ) -> tuple[Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return (torch.randn(batch, seqlen, dim, generator=generator),)


class PackedTokenIndexer(nn.Module):
    """GLM-5-like indexer on packed tokens. forward(x [N,dim], key_start [N], key_end [N]) ->
    (values [N,k], indices [N,k]); query n sees keys [key_start[n], key_end[n])."""

    def __init__(self, dim: int, n_heads: int = 32, head_dim: int = 16, index_topk: int = 8,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.n_heads, self.head_dim, self.index_topk = n_heads, head_dim, index_topk
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False, dtype=dtype)
        self.wk = nn.Linear(dim, head_dim, bias=False, dtype=dtype)
        self.weights_proj = nn.Linear(dim, n_heads, bias=False, dtype=torch.float32)
        self.scale = (n_heads * head_dim) ** -0.5

    def forward(self, x: Tensor, key_start: Tensor, key_end: Tensor) -> tuple[Tensor, Tensor]:
        tokens = x.shape[0]
        q = self.wq(x.to(self.wq.weight.dtype)).view(tokens, self.n_heads, self.head_dim)
        k = self.wk(x.to(self.wk.weight.dtype))
        weights = self.weights_proj(x.float()) * self.scale
        score = torch.einsum("mhd,nd->hmn", q.float(), k.float())
        logits = (score.relu() * weights.unsqueeze(-1).transpose(0, 1)).sum(dim=0)
        positions = torch.arange(tokens, device=x.device)
        visible = (positions[None, :] >= key_start[:, None]) & (positions[None, :] < key_end[:, None])
        logits = logits.masked_fill(~visible, float("-inf"))
        return logits.topk(min(self.index_topk, tokens), dim=-1)


class PackedSparseAttentionBlock(nn.Module):
    """Packed-token attention over the indexer's selected keys, gathered per token (the serving
    layout). forward(x [N,dim], key_start [N], key_end [N]) -> [N,dim]."""

    def __init__(self, dim: int = 32, n_heads: int = 4, head_dim: int = 8, index_n_heads: int = 32,
                 index_head_dim: int = 16, index_topk: int = 8):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.norm = nn.RMSNorm(dim)
        self.indexer = PackedTokenIndexer(dim, index_n_heads, index_head_dim, index_topk)
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wkv = nn.Linear(dim, 2 * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)

    def forward(self, x: Tensor, key_start: Tensor, key_end: Tensor) -> Tensor:
        tokens = x.shape[0]
        h = self.norm(x)
        _, selected = self.indexer(h, key_start, key_end)                    # [N, k]
        q = self.wq(h).view(tokens, self.n_heads, self.head_dim)
        k, v = self.wkv(h).view(tokens, 2, self.head_dim).unbind(1)          # one shared KV head
        valid = (selected >= key_start[:, None]) & (selected < key_end[:, None])
        k_sel, v_sel = k[selected], v[selected]                              # [N, k, D]
        scores = torch.einsum("nhd,nkd->nhk", q, k_sel) * self.head_dim ** -0.5
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        out = torch.einsum("nhk,nkd->nhd", F.softmax(scores, dim=-1), v_sel)
        return x + self.wo(out.flatten(1))

    @staticmethod
    def example_inputs(sequence_lengths: tuple[int, ...] = (10, 14), dim: int = 32, seed: int = 0
                       ) -> tuple[Tensor, Tensor, Tensor]:
        """(x, key_start, key_end) for causal sequences packed back to back."""
        generator = torch.Generator().manual_seed(seed)
        starts = torch.cat([torch.full((n,), sum(sequence_lengths[:i]))
                            for i, n in enumerate(sequence_lengths)])
        key_end = torch.arange(1, sum(sequence_lengths) + 1)
        x = torch.randn(sum(sequence_lengths), dim, generator=generator)
        return x, starts, key_end
