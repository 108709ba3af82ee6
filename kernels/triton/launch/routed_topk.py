"""misa::routed_topk on the GPU, MISA's sparse scoring: each query's routed heads (from
route_heads) are gathered once into contiguous [B, S, h, D] / [B, S, h] tensors, then scored and
selected by the same pipeline as the dense op (scored_topk.py) over h heads instead of H."""
from __future__ import annotations

from .device_checks import either, fold_query_scale, poison_selection, scale_faults
from .scored_topk import scored_topk


def routed_topk_op(q, k, w, heads, k_top, scale, causal, key_start, key_end, mask, chunk=0,
                   q_scale=None, k_scale=None):
    """The op (inputs validated by the caller). A head id outside [0, H) is clamped before the
    gather reads it and poisons its query's row, as does a bad scale."""
    num_heads = q.shape[2]
    bad_head = ((heads < 0) | (heads >= num_heads)).any(-1)
    values, indices = scored_topk(q, k, fold_query_scale(w, q_scale),
                                  heads.clamp(0, num_heads - 1), k_top, scale, causal, key_start,
                                  key_end, chunk, k_scale=k_scale, mask=mask)
    return poison_selection(values, indices, either(bad_head, scale_faults(q_scale, k_scale)))
