"""misa::dense_topk on the GPU: the all-head index score and its top-k, by the chunked
scoring + selection pipeline (scored_topk.py)."""
from __future__ import annotations

from .device_checks import fold_query_scale, poison_selection, scale_faults
from .scored_topk import scored_topk


def dense_topk_op(q, k, w, k_top, scale, causal, key_start, key_end, mask, chunk=0,
                  q_scale=None, k_scale=None):
    """The op (inputs validated by the caller); rows with a bad scale are poisoned."""
    values, indices = scored_topk(q, k, fold_query_scale(w, q_scale), k_top, scale, causal,
                                  key_start, key_end, chunk, k_scale=k_scale, mask=mask)
    return poison_selection(values, indices, scale_faults(q_scale, k_scale))
