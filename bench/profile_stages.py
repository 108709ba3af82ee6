"""Time of each stage of the selection pipelines on one CUDA card, to see where the time goes:
top-k alone of [8192 x 65536] fp32 (sample threshold, candidate emission, candidate top-k) and
MISA / dense at 8192 queries x 64K keys (router, sampled scores, threshold, emitting scores,
candidate top-k), with a few launch variants of the in-register selection kernels.

    python bench/profile_stages.py"""
from __future__ import annotations

import json

import torch
import triton

import misa_compile  # noqa: F401
from misa_compile.kernels.triton import candidate_topk as ct
from misa_compile.kernels.triton import sample_threshold as st
from misa_compile.kernels.triton.emit_candidates import emit_candidates
from misa_compile.kernels.triton.index_scores import index_scores
from misa_compile.kernels.triton.router import route_heads
from misa_compile.kernels.triton.row_topk import plan_selection
from workloads import make_inputs


def ms(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def main():
    out = {}
    rows, width, K = 8192, 65536, 2048
    plan = plan_selection(K, width)
    x = torch.randn(1, rows, width, device="cuda")
    lo = torch.empty(rows, device="cuda")
    st.sample_threshold(x, plan.rank, plan.n_sample, lo, column_stride=plan.key_stride)
    out["topk.sample_threshold"] = ms(lambda: st.sample_threshold(
        x, plan.rank, plan.n_sample, lo, column_stride=plan.key_stride))
    cand_val = torch.empty(rows, plan.capacity, device="cuda")
    cand_idx = torch.empty(rows, plan.capacity, dtype=torch.int32, device="cuda")
    count = torch.zeros(rows, dtype=torch.int32, device="cuda")
    out["topk.emit_candidates"] = ms(lambda: (count.zero_(), emit_candidates(
        x, lo, cand_val, cand_idx, count)))
    values = torch.empty(1, rows, K, device="cuda")
    indices = torch.empty(1, rows, K, dtype=torch.int64, device="cuda")
    flags = torch.zeros(rows, dtype=torch.int8, device="cuda")
    for warps in (2, 4, 8, 16):
        def run(warps=warps):
            ct.candidate_topk_kernel[(rows,)](
                cand_val, cand_idx, count, lo, lo, values, indices, flags, rows,
                plan.capacity, width, K, 0, plan.capacity, 0, plan.capacity, 1,
                values.stride(0), values.stride(1), HAS_COUNT=True, HAS_IDX=True, HAS_LO=True,
                HAS_TAIL=False, BLOCK=plan.capacity, num_warps=warps)
        out[f"topk.candidate_topk warps={warps}"] = ms(run)
        sample = x[..., :plan.n_sample].contiguous()
        out[f"topk.threshold_contig warps={warps}"] = ms(lambda w=warps: st.sample_threshold_kernel[(rows,)](
            sample, lo, rows, plan.n_sample, plan.n_sample, plan.rank, 1, 0, plan.n_sample, 1,
            RUN=1, BLOCK=plan.n_sample, num_warps=w))
    out["torch.topk"] = ms(lambda: x.topk(K, dim=-1, sorted=False))
    out["read 2 GiB (sum)"] = ms(lambda: x.sum())
    del x, cand_val, cand_idx
    torch.cuda.empty_cache()

    q, k, w = make_inputs(1, 8192, 65536, 64)
    heads = route_heads(q, k, w, 8, 1024, True, None, None)
    out["misa.route_heads"] = ms(lambda: route_heads(q, k, w, 8, 1024, True, None, None))
    vis = dict(causal=True, key_start=None, key_end=None, scale=1.0)
    sample = torch.empty(1, 8192, plan.n_sample, device="cuda")
    lo = torch.empty(8192, device="cuda")
    cand_val = torch.empty(8192, plan.capacity, device="cuda")
    cand_idx = torch.empty(8192, plan.capacity, dtype=torch.int32, device="cuda")
    count = torch.zeros(8192, dtype=torch.int32, device="cuda")
    for name, hd in (("misa", heads), ("dense", None)):
        out[f"{name}.sample_scores"] = ms(lambda hd=hd: index_scores(
            q, k, w, rows=8192, row0=0, n_cols=plan.n_sample, key_stride=plan.key_stride,
            out=sample, heads=hd, **vis))
        out[f"{name}.threshold"] = ms(lambda: st.sample_threshold(sample, plan.rank,
                                                                  plan.n_sample, lo))
        out[f"{name}.emit_scores"] = ms(lambda hd=hd: (count.zero_(), index_scores(
            q, k, w, rows=8192, row0=0, n_cols=65536, emit=(lo, cand_val, cand_idx, count),
            heads=hd, **vis)))
        full = torch.empty(1, 1024, 65536, device="cuda")
        out[f"{name}.full_scores 1024 rows (x8)"] = 8 * ms(lambda hd=hd: index_scores(
            q[:, :1024], k, w[:, :1024], rows=1024, row0=0, n_cols=65536, out=full, heads=hd
            if hd is None else hd[:, :1024], total_queries=8192, **vis))
        del full
        out[f"{name}.candidates per row"] = float(count.float().mean())
        out[f"{name}.candidate_topk"] = ms(lambda: ct.candidate_topk(
            cand_val.view(1, 8192, -1), K, 65536, values, indices, ids=cand_idx.view(1, 8192, -1),
            count=count, lo=lo, flags=flags))
    for key, value in out.items():
        print(f"{key:45s} {value:9.3f}", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
