"""Which misa op calls the Triton kernels cover on CUDA, and why the others run the chunked torch
implementation there. One table, read by the CUDA registration (kernels/triton/register.py, which
falls back to torch and warns once per reason) and by the graph pass's site report (which says
what each site will run), so the two can never disagree."""
from __future__ import annotations

from typing import Optional

# Reasons a CUDA call runs the torch implementation instead of the Triton kernels.
QNORM_ROUTER = "router='qnorm' (an ablation) has no Triton kernel"


def cuda_fallback_reason(op_name: str, router: str = "score") -> Optional[str]:
    """None when the Triton kernels run `op_name` on CUDA, else why the torch implementation
    does. Masks (bool or additive, any broadcastable shape), ragged ranges, causality and FP8
    inputs are all covered by the kernels."""
    if op_name == "route_heads" and router != "score":
        return QNORM_ROUTER
    return None


def variant_fallback_reason(variant: str, router: str = "score") -> Optional[str]:
    """cuda_fallback_reason for the chain of ops an indexer variant emits (kernels/indexer.py)."""
    if variant in ("misa", "misa_hier"):
        return cuda_fallback_reason("route_heads", router)
    return None
