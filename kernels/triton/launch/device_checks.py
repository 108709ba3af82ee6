"""Value checks of the op inputs, done on the device (no host synchronisation, so calls queue
back to back and can be captured in CUDA graphs). What indexes memory is clamped before any
kernel reads it; a row whose inputs were out of range is then poisoned rather than returned as a
plausible selection: values NaN and indices -1 (-1 ids for the id-only outputs). The host-side
checks that raise instead run on the CPU and in debug mode (kernels/validation.py)."""
from __future__ import annotations

from typing import Optional

import torch

from ..poison_rows import poison_rows


def fold_query_scale(w: torch.Tensor, q_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """w * q_scale (fp32): a positive factor per query and head commutes with the ReLU of the
    index score, HISA's block score and the router's |w|-weighted sum. A bad scale only poisons
    (scale_faults): the fold itself reads nothing out of bounds."""
    # One kernel: type promotion computes a 16-bit w times the fp32 scale in fp32.
    return w if q_scale is None else w * q_scale


def _rows_with_a_bad_scale(scale: torch.Tensor) -> torch.Tensor:
    """bool: the rows (last dim reduced) of an fp32 scale with an entry not finite and > 0, from
    one reduction (a decode k_scale [64, 64K] is 16 MiB: every elementwise pass over it costs)."""
    if scale.shape[-1] == 0:
        return torch.zeros(scale.shape[:-1], dtype=torch.bool, device=scale.device)
    low, high = torch.aminmax(scale, dim=-1)
    # NaN propagates through both reductions and fails both comparisons; -inf fails the first,
    # +inf the second.
    return ~((low > 0) & (high < float("inf")))


def scale_faults(q_scale: Optional[torch.Tensor], k_scale: Optional[torch.Tensor]
                 ) -> Optional[torch.Tensor]:
    """bool [B, S] (or [B, 1] from k_scale alone): rows with a q_scale [B, S, H] entry that is
    not finite and > 0, and every row of a sequence with such a k_scale [B, T] entry (which key
    a row would have ranked with it is not worth finding out: the input is wrong). None when no
    scale is given."""
    faults = None
    if q_scale is not None:
        faults = _rows_with_a_bad_scale(q_scale)
    if k_scale is not None:
        per_sequence = _rows_with_a_bad_scale(k_scale)[:, None]
        faults = per_sequence if faults is None else faults | per_sequence
    return faults


def either(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if a is None:
        return b
    return a if b is None else a | b


def poison_selection(values: torch.Tensor, indices: torch.Tensor,
                     faults: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """values NaN and indices -1 in the rows (leading dims of the selection) where faults is
    set; faults broadcasts to the selection's leading dims. In place: the selection is always
    the op's own fresh output, and only the faulted rows are written (poison_rows)."""
    if faults is not None:
        poison_rows(values, indices, faults)
    return values, indices


def poison_ids(ids: torch.Tensor, faults: Optional[torch.Tensor]) -> torch.Tensor:
    """-1 in the rows of an id-only output (routed heads, HISA candidate ids) where faults is
    set. The consumers poison in turn: routed_topk poisons a row with a head id outside
    [0, H); rerank_topk checks the same scales as hisa_candidates."""
    if faults is not None:
        poison_rows(None, ids, faults)  # in place, as poison_selection
    return ids
