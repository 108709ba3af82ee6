"""misa::routed_topk on the GPU, MISA's sparse scoring: one launch (scoring/routed_inputs.py)
gathers each query's routed heads (from route_heads) into contiguous [B, S, h, D] / [B, S, h]
tensors, folds q_scale into w and flags the queries with a bad head id or q_scale; the same
pipeline as the dense op (scored_topk.py) then scores and selects over h heads instead of H."""
from __future__ import annotations

from ..scoring.routed_inputs import routed_inputs
from .device_checks import either, poison_selection, scale_faults
from .scored_topk import scored_topk


def routed_topk_op(q, k, w, heads, k_top, scale, causal, key_start, key_end, mask, chunk=0,
                   q_scale=None, k_scale=None):
    """The op (inputs validated by the caller). A head id outside [0, H) (route_heads' -1 of a
    poisoned row included) is clamped before the gather reads it and poisons its query's row, as
    does a bad q_scale entry of the row or a bad k_scale entry of its sequence."""
    q_routed, w_routed, faults = routed_inputs(q, w, heads, q_scale)
    values, indices = scored_topk(q_routed, k, w_routed, k_top, scale, causal, key_start,
                                  key_end, chunk, k_scale=k_scale, mask=mask)
    return poison_selection(values, indices, either(faults, scale_faults(None, k_scale)))
