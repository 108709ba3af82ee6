"""Time of each stage of the selection pipelines on one CUDA card, to see where the time goes:
top-k alone of [8192 x 65536] fp32 (sample threshold, row compaction, candidate top-k) and
dense / MISA at 8192 queries x 64K keys (router, head gather, scoring, selection from the
scores, the fused selection route, the whole op), MISA-hierarchical's all-head re-rank of 8192
candidates per query (gathered scoring against the same math on contiguous keys, candidate
top-k, the whole op), causal prefill given as causal=True against the same visibility as ragged
key ranges (what the pass hands the kernels when it folds a packed-sequence mask), and decode at
64 sequences x 64K keys (contiguous, and paged with cached pooled keys); MISA-hierarchical's
routed top-8192 stage by stage, and MISA with a bool mask against causal=True; what the
candidate append costs MISA's EMIT; the router's stages, its scores kernel with the top-h
heads selected in it or by candidate_topk, and with other tiles;
MISA's stages and the decode ops with FP8 inputs against bf16; decode scoring with other tiles
(dense and routed, contiguous and paged, bf16 and FP8 keys); the host time of plain op calls
and the functions it goes to; EMIT under configs beyond the tuner's.

    python bench/profile_stages.py [--only hier,masked]"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import time

import torch
from torch._library.triton import set_wrap_triton_enabled
import triton

import misa_compile  # noqa: F401
from misa_compile.kernels.torch_impl import gather_heads
from misa_compile.kernels.triton.selection import candidate_topk as ct
from misa_compile.kernels.triton.selection import sample_threshold as st
from misa_compile.kernels.triton.selection.compact_rows import _tuned_kernel as compact_rows_tuned
from misa_compile.kernels.triton.selection.compact_rows import compact_rows
from misa_compile.kernels.triton.scoring import index_scores as isc
from misa_compile.kernels.triton.scoring.index_scores import index_scores
from misa_compile.kernels.triton.scoring import query_scores as qsc
from misa_compile.kernels.triton.scoring.query_scores import query_scores
from misa_compile.kernels.triton.scoring.block_visibility import block_visibility
from misa_compile.kernels.triton.scoring import router_scores as rs
from misa_compile.kernels.triton.scoring.router_scores import pooled_keys
from misa_compile.kernels.triton.launch.route_heads import route_heads
from misa_compile.kernels.triton.scoring.routed_inputs import routed_inputs
from misa_compile.kernels.triton.selection.hidden_tails import hidden_tails
from misa_compile.kernels.triton.selection.row_topk import plan_selection, topk_rows
from workloads import make_inputs, quantize_fp8


def ms(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def topk_alone(out, rows=8192, width=65536, K=2048):
    plan = plan_selection(K, width)
    x = torch.randn(1, rows, width, device="cuda")
    lo = torch.empty(rows, device="cuda")
    out["topk.sample_threshold"] = ms(lambda: st.sample_threshold(
        x, plan.rank, plan.n_sample, lo, column_stride=plan.key_stride))
    cand_val = torch.empty(rows, plan.capacity, device="cuda")
    cand_idx = torch.empty(rows, plan.capacity, dtype=torch.int32, device="cuda")
    count = torch.empty(rows, dtype=torch.int32, device="cuda")
    out["topk.compact_rows"] = ms(lambda: compact_rows(x, lo, cand_val, cand_idx, count))
    out["topk.candidates per row"] = float(count.float().mean())
    values = torch.empty(1, rows, K, device="cuda")
    indices = torch.empty(1, rows, K, dtype=torch.int64, device="cuda")
    flags = torch.zeros(rows, dtype=torch.int8, device="cuda")
    out["topk.candidate_topk"] = ms(lambda: ct.candidate_topk(
        cand_val.view(1, rows, -1), K, width, values, indices, ids=cand_idx.view(1, rows, -1),
        count=count, lo=lo, flags=flags))
    out["topk.topk_rows (all)"] = ms(lambda: topk_rows(x, K, values, indices))
    out["torch.topk"] = ms(lambda: x.topk(K, dim=-1, sorted=False))
    out["read 2 GiB (sum)"] = ms(lambda: x.sum())


def scoring(out, S=8192, T=65536, H=64, h=8, chunk=4096):
    q, k, w = make_inputs(1, S, T, H)
    vis = dict(causal=True, key_start=None, key_end=None, scale=1.0)
    heads = route_heads(q, k, w, h, 1024, True, None, None)
    out["misa.route_heads"] = ms(lambda: route_heads(q, k, w, h, 1024, True, None, None))
    out["misa.routed_inputs"] = ms(lambda: routed_inputs(q, w, heads))
    q_r, w_r, _ = routed_inputs(q, w, heads)
    scores = torch.empty(1, chunk, T, device="cuda")
    n_chunks = S // chunk
    cases = {
        "misa.index_scores gathered": lambda r0: index_scores(
            q_r, k, w_r, rows=chunk, row0=r0, n_cols=T, out=scores, **vis),
        "dense.index_scores": lambda r0: index_scores(
            q, k, w, rows=chunk, row0=r0, n_cols=T, out=scores, **vis),
    }
    for name, fn in cases.items():
        try:
            out[name] = ms(lambda fn=fn: [fn(r0) for r0 in range(0, S, chunk)])
        except Exception as error:  # a variant that fails to build is reported, not fatal
            print(f"{name}: {type(error).__name__}: {str(error)[:300]}", flush=True)
    out["misa.fused emit path (all stages)"] = ms(lambda: fused_emit_path(q_r, k, w_r, vis))
    out["dense.fused emit path (all stages)"] = ms(lambda: fused_emit_path(q, k, w, vis))
    values = torch.empty(1, chunk, 2048, device="cuda")
    indices = torch.empty(1, chunk, 2048, dtype=torch.int64, device="cuda")
    out["select.topk_rows per chunks"] = n_chunks * ms(lambda: topk_rows(scores, 2048, values,
                                                                         indices))
    ops = torch.ops.misa
    out["op.routed_topk"] = ms(lambda: ops.routed_topk(q, k, w, heads, 2048, 1.0, True))
    out["op.dense_topk"] = ms(lambda: ops.dense_topk(q, k, w, 2048, 1.0, True))


EMIT_VISIBILITY = dict(causal=True, key_start=None, key_end=None, scale=1.0)


def routed_emit_inputs(S, T=65536, H=64, h=8, K=2048):
    """MISA's EMIT inputs at S queries x T keys, causal: the routed q and w, the keys, the real
    threshold (from the sampled scores), empty candidate lists of the plan's capacity."""
    q, k, w = make_inputs(1, S, T, H)
    heads = route_heads(q, k, w, h, 1024, True, None, None)
    q_r, w_r = gather_heads(q, w, heads)
    del q, w
    plan = plan_selection(K, T)
    sample = torch.empty(1, S, plan.n_sample, device="cuda")
    lo = torch.empty(S, device="cuda")
    index_scores(q_r, k, w_r, rows=S, row0=0, n_cols=plan.n_sample, key_stride=plan.key_stride,
                 out=sample, **EMIT_VISIBILITY)
    st.sample_threshold(sample, plan.rank, plan.n_sample, lo)
    cand_val = torch.empty(S, plan.capacity, device="cuda")
    cand_idx = torch.empty(S, plan.capacity, dtype=torch.int32, device="cuda")
    count = torch.zeros(S, dtype=torch.int32, device="cuda")
    return q_r, k, w_r, lo, (cand_val, cand_idx, count)


def append_cost(out, S=8192, T=65536, H=64, h=8, K=2048):
    """What the candidate append costs MISA's EMIT at 8192 x 64K: EMIT with the real threshold
    (~2800 of 65536 keys appended a row), with a threshold nothing reaches (same scoring and
    compare, no slot reserved or stored), and FULL (every score written) for comparison."""
    q_r, k, w_r, lo, (cand_val, cand_idx, count) = routed_emit_inputs(S, T, H, h, K)
    vis = EMIT_VISIBILITY
    none_kept = torch.full_like(lo, float("inf"))
    for name, threshold in (("real threshold", lo), ("nothing kept", none_kept)):
        out[f"append.EMIT {name}"] = ms(lambda threshold=threshold: (count.zero_(), index_scores(
            q_r, k, w_r, rows=S, row0=0, n_cols=T, emit=(threshold, cand_val, cand_idx, count),
            **vis)))
        out[f"append.candidates per row, {name}"] = float(count.float().mean())
    chunk = 2048
    scores = torch.empty(1, chunk, T, device="cuda")
    out["append.FULL (all scores written)"] = ms(lambda: [index_scores(
        q_r, k, w_r, rows=chunk, row0=r0, n_cols=T, out=scores, **vis)
        for r0 in range(0, S, chunk)])
    for key, config in isc._tuned_emit.cache.items():
        print(f"index_scores EMIT best config for {key[:4]}: {config}", flush=True)


def fused_emit_path(q, k, w, vis, K=2048, out=None, prefix=""):
    """Selection fused into scoring (index_scores EMIT): sampled scores, threshold, scores >= it
    appended to candidate lists, candidate top-k; the [S, T] scores are never written. With
    `out`, each stage is also timed alone under prefix."""
    S, T = q.shape[1], k.shape[1]
    plan = plan_selection(K, T)
    sample = torch.empty(1, S, plan.n_sample, device="cuda")
    lo = torch.empty(S, device="cuda")
    cand_val = torch.empty(S, plan.capacity, device="cuda")
    cand_idx = torch.empty(S, plan.capacity, dtype=torch.int32, device="cuda")
    count = torch.zeros(S, dtype=torch.int32, device="cuda")
    values = torch.empty(1, S, K, device="cuda")
    indices = torch.empty(1, S, K, dtype=torch.int64, device="cuda")
    stages = {
        "sampled scores": lambda: index_scores(q, k, w, rows=S, row0=0, n_cols=plan.n_sample,
                                               key_stride=plan.key_stride, out=sample, **vis),
        "threshold": lambda: st.sample_threshold(sample, plan.rank, plan.n_sample, lo),
        "emit": lambda: (count.zero_(), index_scores(
            q, k, w, rows=S, row0=0, n_cols=T, emit=(lo, cand_val, cand_idx, count), **vis)),
        "candidate_topk": lambda: ct.candidate_topk(
            cand_val.view(1, S, -1), K, T, values, indices, ids=cand_idx.view(1, S, -1),
            count=count, lo=lo),
    }
    for stage in stages.values():
        stage()
    if out is not None:
        for name, stage in stages.items():
            out[f"{prefix}{name}"] = ms(stage)
        out[f"{prefix}candidates per row (capacity {plan.capacity})"] = float(count.float().mean())


def hier_stages(out, S=8192, T=65536, H=64, h=8, C=8192, K=2048):
    """MISA-hierarchical at 8192 x 64K, stage by stage: the routed top-C (sampled scores,
    threshold, candidate append, candidate top-k over lists of up to 16384), the re-rank."""
    q, k, w = make_inputs(1, S, T, H)
    vis = dict(causal=True, key_start=None, key_end=None, scale=1.0)
    heads = route_heads(q, k, w, h, 1024, True, None, None)
    q_r, w_r = gather_heads(q, w, heads)
    fused_emit_path(q_r, k, w_r, vis, K=C, out=out, prefix=f"hier.routed top {C}: ")
    ops = torch.ops.misa
    out[f"hier.op routed_topk top {C}"] = ms(lambda: ops.routed_topk(q, k, w, heads, C, 1.0,
                                                                     True))
    _, candidates = ops.routed_topk(q, k, w, heads, C, 1.0, True)
    out["hier.op rerank_topk"] = ms(lambda: ops.rerank_topk(q, k, w, candidates, K, 1.0, True))


def wide_rows(out, rows=8192, width=16384, K=8192):
    """In-register top-k of rows as wide as MISA-hierarchical's candidate lists (16384 lanes,
    k = 8192): held in registers (chunk = width) against streamed in pieces of 8192, 4096 and
    2048 lanes; each checked against torch.topk."""
    x = torch.randn(1, rows, width, device="cuda")
    values = torch.empty(1, rows, K, device="cuda")
    indices = torch.empty(1, rows, K, dtype=torch.int64, device="cuda")
    expect = x.topk(K, dim=-1).values.sort(-1).values
    for chunk in (width, 8192, 4096, 2048):
        ct.candidate_topk(x, K, width, values, indices, chunk=chunk)
        exact = torch.equal(values.sort(-1).values, expect)
        out[f"wide.candidate_topk pieces of {chunk}{'' if exact else ' WRONG'}"] = ms(
            lambda chunk=chunk: ct.candidate_topk(x, K, width, values, indices, chunk=chunk))


def masked(out, S=1024, T=65536, H=64, h=8, K=2048):
    """MISA with the causal visibility given as a bool [S, T] mask (causal=False), as
    bench_indexer's 'bool mask' rows, against causal=True: the router's block visibility, the
    router, the routed selection, the hidden-id fill of masked selections."""
    q, k, w = make_inputs(1, S, T, H)
    pos = torch.arange(T, device="cuda")
    mask = (pos[None, :] <= (T - S + torch.arange(S, device="cuda"))[:, None])[None]
    ops = torch.ops.misa
    heads = route_heads(q, k, w, h, 1024, True, None, None)
    out["masked.block_visibility"] = ms(lambda: block_visibility(mask, 1, S, T, 1024, False,
                                                                 None, None))
    out["masked.route_heads"] = ms(lambda: route_heads(q, k, w, h, 1024, False, None, None,
                                                       mask=mask))
    out["causal.route_heads"] = ms(lambda: route_heads(q, k, w, h, 1024, True, None, None))
    out["masked.op routed_topk"] = ms(lambda: ops.routed_topk(q, k, w, heads, K, 1.0, False,
                                                              mask=mask))
    out["causal.op routed_topk"] = ms(lambda: ops.routed_topk(q, k, w, heads, K, 1.0, True))
    values, indices = ops.routed_topk(q, k, w, heads, K, 1.0, False, mask=mask)
    out["masked.hidden_tails"] = ms(lambda: hidden_tails(values, indices, mask, T, False, None,
                                                         None))
    out["masked.op dense_topk"] = ms(lambda: ops.dense_topk(q, k, w, K, 1.0, False, mask=mask))
    out["causal.op dense_topk"] = ms(lambda: ops.dense_topk(q, k, w, K, 1.0, True))


def rerank(out, S=8192, T=65536, H=64, C=8192, K=2048, chunk=2048):
    """The re-rank stage of MISA-hierarchical: every query's C candidate keys (sorted random ids
    of the visible causal range, as the routed stage hands them over) scored with all H heads,
    then the top K of them. The same scoring over C contiguous keys shows what the gather costs
    (identical math: H x C dot products of D per query)."""
    q, k, w = make_inputs(1, S, T, H)
    gen = torch.Generator(device="cuda").manual_seed(1)
    visible = torch.arange(T - S + 1, T + 1, device="cuda")[:, None]
    candidates = (torch.rand(S, C, generator=gen, device="cuda") * visible).long()
    candidates = candidates.sort(-1).values[None]
    vis = dict(causal=True, key_start=None, key_end=None, scale=1.0)
    scores = torch.empty(1, chunk, C, device="cuda")
    chunks = range(0, S, chunk)
    out["rerank.query_scores gathered"] = ms(lambda: [query_scores(
        q, k, w, scores, rows=chunk, row0=r0, candidates=candidates[:, r0:r0 + chunk], **vis)
        for r0 in chunks])
    # Keys 0..C-1 are visible to every query of the causal chunk at the end of T.
    out["rerank.query_scores contiguous"] = ms(lambda: [query_scores(
        q, k, w, scores, rows=chunk, row0=r0, **vis) for r0 in chunks])
    out["rerank.index_scores contiguous"] = ms(lambda: [index_scores(
        q, k, w, rows=chunk, row0=r0, n_cols=C, out=scores, **vis) for r0 in chunks])
    values = torch.empty(1, chunk, K, device="cuda")
    indices = torch.empty(1, chunk, K, dtype=torch.int64, device="cuda")
    out["rerank.candidate_topk"] = len(chunks) * ms(lambda: ct.candidate_topk(
        scores, K, T, values, indices, ids=candidates[:, :chunk]))
    out["rerank.op rerank_topk"] = ms(lambda: torch.ops.misa.rerank_topk(
        q, k, w, candidates, K, 1.0, True))


def ranges_against_causal(out, T=32768, H=64, h=8, C=8192, K=2048):
    """Prefill of T queries over T keys, visibility as causal=True and as the equal ragged ranges
    [0, t + 1): the routed stage of MISA-hierarchical (top C), its re-rank (top K) and MISA's
    routed top-K. With ranges the launcher cannot shrink a chunk's key count to its last visible
    key, so early chunks take the sampled-threshold path where causal ones take the direct one."""
    q, k, w = make_inputs(1, T, T, H)
    heads = route_heads(q, k, w, h, 1024, True, None, None)
    ranges = dict(causal=False, key_start=torch.zeros(1, T, dtype=torch.int64, device="cuda"),
                  key_end=torch.arange(1, T + 1, device="cuda")[None])
    ops = torch.ops.misa
    for name, vis in (("causal", dict(causal=True)), ("ranges", ranges)):
        _, candidates = ops.routed_topk(q, k, w, heads, C, 1.0, **vis)
        out[f"{name}.routed_topk top {C}"] = ms(lambda vis=vis: ops.routed_topk(
            q, k, w, heads, C, 1.0, **vis))
        out[f"{name}.rerank_topk"] = ms(lambda vis=vis, c=candidates: ops.rerank_topk(
            q, k, w, c, K, 1.0, **vis))
        out[f"{name}.routed_topk top {K}"] = ms(lambda vis=vis: ops.routed_topk(
            q, k, w, heads, K, 1.0, **vis))


def decode(out, batch=64, T=65536, H=64, h=8, K=2048):
    """One query per sequence: scoring, selection, router, whole ops; the key-read floor."""
    q, k, w = make_inputs(batch, 1, T, H)
    vis = dict(causal=True, key_start=None, key_end=None, scale=1.0)
    scores = torch.empty(batch, 1, T, device="cuda")
    out["decode.query_scores dense"] = ms(lambda: query_scores(q, k, w, scores, rows=1, row0=0,
                                                               **vis))
    heads = route_heads(q, k, w, h, 1024, True, None, None)
    q_r, w_r = gather_heads(q, w, heads)
    out["decode.query_scores routed"] = ms(lambda: query_scores(q_r, k, w_r, scores, rows=1,
                                                                row0=0, **vis))
    values = torch.empty(batch, 1, K, device="cuda")
    indices = torch.empty(batch, 1, K, dtype=torch.int64, device="cuda")
    out["decode.topk_rows"] = ms(lambda: topk_rows(scores, K, values, indices))
    out["decode.pooled_keys"] = ms(lambda: pooled_keys(k, 1024))
    out["decode.route_heads"] = ms(lambda: route_heads(q, k, w, h, 1024, True, None, None))
    ops = torch.ops.misa
    out["decode.op dense_topk"] = ms(lambda: ops.dense_topk(q, k, w, K, 1.0, True))
    out["decode.op routed_topk"] = ms(lambda: ops.routed_topk(q, k, w, heads, K, 1.0, True))
    # Where the op's time goes beyond its two kernels: every launch and host sync of one call.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            ops.dense_topk(q, k, w, K, 1.0, True)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), flush=True)
    out["decode.read keys (sum)"] = ms(lambda: k.sum())
    copy = torch.empty_like(k)
    out["decode.copy keys"] = ms(lambda: copy.copy_(k))


def paged_cache(k, page=64, k_scale=None):
    """(k_cache, block_table, seq_lens, k_scale's pages or None) of keys k [B, T, D] (and their
    scales [B, T]) over pages in shuffled order, every sequence full."""
    batch, T, _ = k.shape
    pages = T // page
    order = torch.randperm(batch * pages, device="cuda")

    def shuffled(x):  # moved as bytes: index_put has no FP8 kernel
        flat = x.reshape(batch * pages, page, -1)
        out = torch.empty_like(flat)
        out.view(torch.uint8)[order] = flat.view(torch.uint8)
        return out.view(batch * pages, page, *x.shape[2:])
    lens = torch.full((batch,), T, dtype=torch.int32, device="cuda")
    return (shuffled(k), order.view(batch, pages).int(), lens,
            None if k_scale is None else shuffled(k_scale))


def paged_decode(out, batch=64, T=65536, H=64, h=8, K=2048, page=64):
    """Decode over a paged cache (pages shuffled), dense against MISA with cached pooled keys:
    each stage of the op alone, the whole ops, and every kernel of one call of each (profiler)."""
    q, k, w = make_inputs(batch, 1, T, H)
    k_cache, table, lens, _ = paged_cache(k, page)
    del k
    ops = torch.ops.misa
    pooled = ops.paged_pooled_keys(k_cache, table, lens, 1024)
    end = lens.view(batch, 1)
    vis = dict(causal=False, key_start=torch.zeros_like(end), key_end=end)
    scores = torch.empty(batch, 1, T, device="cuda")
    out["paged.query_scores dense"] = ms(lambda: query_scores(
        q, k_cache, w, scores, rows=1, row0=0, scale=1.0, block_table=table, **vis))
    heads = route_heads(q, k_cache, w, h, 1024, **vis, block_table=table, seq_lens=lens,
                        kbar=pooled)
    out["paged.route_heads cached"] = ms(lambda: route_heads(
        q, k_cache, w, h, 1024, **vis, block_table=table, seq_lens=lens, kbar=pooled))
    out["paged.routed_inputs"] = ms(lambda: routed_inputs(q, w, heads))
    q_r, w_r, _ = routed_inputs(q, w, heads)
    out["paged.query_scores routed"] = ms(lambda: query_scores(
        q_r, k_cache, w_r, scores, rows=1, row0=0, scale=1.0, block_table=table, **vis))
    values = torch.empty(batch, 1, K, device="cuda")
    indices = torch.empty(batch, 1, K, dtype=torch.int64, device="cuda")
    out["paged.topk_rows"] = ms(lambda: topk_rows(scores, K, values, indices,
                                                  tail_base=lens.long()))
    calls = {"dense": lambda: ops.paged_decode_topk(q[:, 0], k_cache, w[:, 0], table, lens, K),
             "misa cached": lambda: ops.paged_decode_topk(
                 q[:, 0], k_cache, w[:, 0], table, lens, K, h, 1024, pooled_keys=pooled)}
    for name, call in calls.items():
        out[f"paged.op {name}"] = ms(call)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                call()
            torch.cuda.synchronize()
        print(f"paged decode, {name}: kernels of 5 calls", flush=True)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20), flush=True)
    out["paged.read keys (sum)"] = ms(lambda: k_cache.sum())


def decode_tiles(out, batch=64, T=65536, H=64, h=8):
    """Decode 64 x 64K scoring (query_scores) with other (BLOCK_N, warps, stages) tiles than the
    default (first), dense and routed, over contiguous keys and a paged cache, bf16 and FP8
    keys: where the routed paged scoring loses to the dense one."""
    default_tile = qsc.query_tile
    q, k, w = make_inputs(batch, 1, T, H)
    q8, k8, q_scale, k_scale = quantize_fp8(q, k)
    heads = route_heads(q, k, w, h, 1024, True, None, None)
    forms = {"bf16": (q, k, w, None), "fp8": (q8, k8, w.float() * q_scale, k_scale)}
    scores = torch.empty(batch, 1, T, device="cuda")
    tiles = [None, (128, 4, 3), (128, 8, 3), (64, 4, 4), (32, 4, 4), (128, 4, 2), (256, 8, 2)]
    for form, (qq, kk, ww, ks) in forms.items():
        k_cache, table, lens, paged_scale = paged_cache(kk, k_scale=ks)
        end = lens.view(batch, 1)
        ranges = dict(causal=False, key_start=torch.zeros_like(end), key_end=end)
        q_r, w_r, _ = routed_inputs(qq, ww, heads)
        cases = {"dense": (qq, ww), "routed": (q_r, w_r)}
        for tile in tiles:
            if tile is not None:
                qsc.query_tile = lambda block_h, key_bytes, gathered, tile=tile: tile
            try:
                for name, (qx, wx) in cases.items():
                    label = f"decode tiles {form} {name} {tile or 'default'}"
                    out[label + " contiguous"] = ms(lambda: query_scores(
                        qx, kk, wx, scores, rows=1, row0=0, causal=True, key_start=None,
                        key_end=None, scale=1.0, k_scale=ks))
                    out[label + " paged"] = ms(lambda: query_scores(
                        qx, k_cache, wx, scores, rows=1, row0=0, scale=1.0, k_scale=paged_scale,
                        block_table=table, **ranges))
            except Exception as error:  # a tile that fails to build is reported, not fatal
                print(f"decode tiles {tile}: {type(error).__name__}: {str(error)[:300]}",
                      flush=True)
            finally:
                qsc.query_tile = default_tile
        # The key-read floor: integer bytes for FP8 (torch sums no FP8).
        keys = k_cache.view(torch.uint8) if k_cache.element_size() == 1 else k_cache
        out[f"decode tiles {form} read keys (sum)"] = ms(lambda: keys.sum())


def host_time(out, T=65536, H=64, h=8, K=2048, calls=20):
    """Host time of plain op calls (the time to issue a call's launches, GPU idle before it),
    MISA against dense at 1024 x 64K and in paged decode 64 x 64K, and where it goes: the
    functions with the most own time over `calls` calls (cProfile)."""
    ops = torch.ops.misa
    q, k, w = make_inputs(1, 1024, T, H)
    heads = route_heads(q, k, w, h, 1024, True, None, None)
    qd, kd, wd = make_inputs(64, 1, T, H)
    k_cache, table, lens, _ = paged_cache(kd)
    pooled = ops.paged_pooled_keys(k_cache, table, lens, 1024)
    cases = {
        "1024x64K dense_topk": lambda: ops.dense_topk(q, k, w, K, 1.0, True),
        "1024x64K route_heads": lambda: ops.route_heads(q, k, w, h, 1024),
        "1024x64K routed_topk": lambda: ops.routed_topk(q, k, w, heads, K, 1.0, True),
        "paged decode dense": lambda: ops.paged_decode_topk(qd[:, 0], k_cache, wd[:, 0], table,
                                                            lens, K),
        "paged decode misa cached": lambda: ops.paged_decode_topk(
            qd[:, 0], k_cache, wd[:, 0], table, lens, K, h, 1024, pooled_keys=pooled)}
    for name, call in cases.items():
        call()
        issue = []
        for _ in range(calls):
            torch.cuda.synchronize()
            start = time.perf_counter()
            call()
            issue.append((time.perf_counter() - start) * 1e3)
        out[f"host.{name} issue ms"] = statistics.median(issue)
        torch.cuda.synchronize()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            call()
        profiler.disable()
        torch.cuda.synchronize()
        print(f"host time of {calls} calls, {name}: functions by own time", flush=True)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


def router(out, T=65536, H=64, h=8):
    """The router's stages (pooled keys, per-head router scores, top-h heads) at 8192 and 1024
    queries: the scores kernel selecting the heads itself (router_top_heads, what route_heads
    launches for H = 64) against the scores written then selected by candidate_topk (the path
    of other H); both kernels with other (BLOCK_R, BLOCK_NB, warps, stages) tiles than the
    default (router_top_heads only where a tile holds whole queries), and pooled_keys with
    other (BLOCK_T, warps) tiles (the default is (256, 8))."""
    default_tile, default_pooling = rs.router_tile, rs.pooling_tile
    k = make_inputs(1, 1, T, H)[1]
    for tile in [(128, 4), (128, 8), (256, 8)]:
        rs.pooling_tile = lambda tile=tile: tile
        try:
            out[f"router.pooled_keys {tile}"] = ms(lambda: pooled_keys(k, 1024))
        finally:
            rs.pooling_tile = default_pooling
    for S in (8192, 1024):
        q, k, w = make_inputs(1, S, T, H)
        kbar = pooled_keys(k, 1024)
        scores = rs.router_scores(q, w, kbar, 1024, T, True, None, None)
        top_scores = torch.empty(1, S, h, device="cuda")
        heads = torch.empty(1, S, h, dtype=torch.int64, device="cuda")
        out[f"router {S}.pooled_keys"] = ms(lambda: pooled_keys(k, 1024))
        out[f"router {S}.top-h heads"] = ms(lambda: ct.candidate_topk(scores, h, H, top_scores,
                                                                      heads))
        out[f"router {S}.route_heads"] = ms(lambda: route_heads(q, k, w, h, 1024, True, None,
                                                                None))
        # (BLOCK_R (query, head) pairs, BLOCK_NB pooled keys, warps, stages)
        tiles = [default_tile(S, H), (64, 64, 4, 1), (64, 64, 4, 3), (64, 16, 4, 1),
                 (128, 32, 8, 1), (128, 64, 8, 2), (32, 32, 4, 1)]
        for tile in tiles:
            rs.router_tile = lambda queries, heads, tile=tile: tile
            try:
                out[f"router {S}.router_scores {tile}"] = ms(
                    lambda: rs.router_scores(q, w, kbar, 1024, T, True, None, None))
                if rs.selects_heads(S, H):
                    out[f"router {S}.router_top_heads {tile}"] = ms(
                        lambda: rs.router_top_heads(q, w, kbar, 1024, T, True, None, None,
                                                    None, h))
            finally:
                rs.router_tile = default_tile


def fp8_against_bf16(out, T=65536, H=64, h=8, K=2048):
    """MISA h=8 stage by stage with bf16 inputs and with their FP8 e4m3 quantization (q_scale
    folded into w, k_scale per key, as the op launches them), at 1024 and 8192 queries; then
    decode at 64 sequences, per-query scoring and the whole ops."""
    ops = torch.ops.misa
    for S in (1024, 8192):
        q, k, w = make_inputs(1, S, T, H)
        q8, k8, q_scale, k_scale = quantize_fp8(q, k)
        forms = {"bf16": (q, k, w, None, None), "fp8": (q8, k8, w, q_scale, k_scale)}
        for form, (qq, kk, ww, qs, ks) in forms.items():
            name = f"fp8 {S}x64K {form}."
            w_eff = ww if qs is None else ww.float() * qs
            out[name + "route_heads"] = ms(lambda: route_heads(qq, kk, w_eff, h, 1024, True, None,
                                                               None, k_scale=ks))
            heads = route_heads(qq, kk, w_eff, h, 1024, True, None, None, k_scale=ks)
            out[name + "routed_inputs"] = ms(lambda: routed_inputs(qq, ww, heads, qs))
            q_r, w_r, _ = routed_inputs(qq, ww, heads, qs)
            vis = dict(causal=True, key_start=None, key_end=None, scale=1.0, k_scale=ks)
            fused_emit_path(q_r, kk, w_r, vis, K=K, out=out, prefix=name)
            out[name + "op routed_topk"] = ms(lambda: ops.routed_topk(
                qq, kk, ww, heads, K, 1.0, True, q_scale=qs, k_scale=ks))
            out[name + "op dense_topk"] = ms(lambda: ops.dense_topk(
                qq, kk, ww, K, 1.0, True, q_scale=qs, k_scale=ks))
        del q, k, w, q8, k8, forms
        torch.cuda.empty_cache()
    q, k, w = make_inputs(64, 1, T, H)
    q8, k8, q_scale, k_scale = quantize_fp8(q, k)
    scores = torch.empty(64, 1, T, device="cuda")
    for form, (qq, kk, ww, qs, ks) in {"bf16": (q, k, w, None, None),
                                       "fp8": (q8, k8, w, q_scale, k_scale)}.items():
        name = f"fp8 decode 64x64K {form}."
        w_eff = ww if qs is None else ww.float() * qs
        vis = dict(causal=True, key_start=None, key_end=None, scale=1.0, k_scale=ks)
        out[name + "query_scores dense"] = ms(lambda: query_scores(qq, kk, w_eff, scores, rows=1,
                                                                   row0=0, **vis))
        heads = route_heads(qq, kk, w_eff, h, 1024, True, None, None, k_scale=ks)
        out[name + "route_heads"] = ms(lambda: route_heads(qq, kk, w_eff, h, 1024, True, None,
                                                           None, k_scale=ks))
        out[name + "op dense_topk"] = ms(lambda: ops.dense_topk(qq, kk, ww, K, 1.0, True,
                                                                q_scale=qs, k_scale=ks))
        out[name + "op routed_topk"] = ms(lambda: ops.routed_topk(qq, kk, ww, heads, K, 1.0,
                                                                  True, q_scale=qs, k_scale=ks))


def sampled_scores(out, T=65536, H=64, h=8, K=2048):
    """The sampled scores of MISA's selection (FULL scores of every 16th key, 8 routed heads),
    bf16 against FP8 inputs, at 1024 and 8192 queries, under each FULL tile config alone and
    as tuned, plainly and from a CUDA graph (FP8 measured 4x slower than bf16 at 1024 queries
    and as fast at 8192: host time or GPU time?)."""
    default = isc._tuned_full
    for S in (1024, 8192):
        q, k, w = make_inputs(1, S, T, H)
        q8, k8, q_scale, k_scale = quantize_fp8(q, k)
        heads = route_heads(q, k, w, h, 1024, True, None, None)
        plan = plan_selection(K, T)
        sample = torch.empty(1, S, plan.n_sample, device="cuda")
        for form, (qq, kk, ww, qs, ks) in {"bf16": (q, k, w, None, None),
                                           "fp8": (q8, k8, w, q_scale, k_scale)}.items():
            q_r, w_r, _ = routed_inputs(qq, ww, heads, qs)
            vis = dict(causal=True, key_start=None, key_end=None, scale=1.0, k_scale=ks)

            def launch():
                index_scores(q_r, kk, w_r, rows=S, row0=0, n_cols=plan.n_sample,
                             key_stride=plan.key_stride, out=sample, **vis)
            out[f"sampled {S}x64K {form}.tuned"] = ms(launch)
            # Replayed from a CUDA graph: GPU time only. A plain launch whose host work takes
            # longer than the kernel shows the host's time in the line above.
            out[f"sampled {S}x64K {form}.tuned, CUDA graph"] = triton.testing.do_bench_cudagraph(
                launch, rep=50, return_mode="median")
            for config in default.configs:
                isc._tuned_full = triton.autotune(configs=[config], key=isc._KEY)(
                    isc.index_scores_kernel)
                try:
                    out[f"sampled {S}x64K {form}.{config}"] = ms(launch)
                finally:
                    isc._tuned_full = default
        del q, k, w, q8, k8
        torch.cuda.empty_cache()
    for key, config in default.cache.items():
        print(f"index_scores FULL best config for {key}: {config}", flush=True)


def emit_tiles(out, T=65536, H=64, h=8, K=2048):
    """MISA's EMIT (8 routed heads, the real threshold) at 8192 and 1024 queries x 64K under
    each of a wider set of configs than the tuner's (tiles, warps, pipeline stages, a register
    cap), each alone: which one the tuner should also try."""
    default = isc._tuned_emit
    tiles = [(64, 128, 4), (64, 128, 8), (128, 128, 8), (64, 256, 8), (128, 64, 4), (64, 64, 4)]
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "PER_ELEMENT": False},
                             num_warps=warps, num_stages=stages)
               for m, n, warps in tiles for stages in (2, 3, 4)]
    configs += [triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "PER_ELEMENT": False},
                              num_warps=4, num_stages=3, maxnreg=reg) for reg in (128, 168)]
    for S in (8192, 1024):
        q_r, k, w_r, lo, (cand_val, cand_idx, count) = routed_emit_inputs(S, T, H, h, K)
        vis = EMIT_VISIBILITY

        def launch():
            count.zero_()
            index_scores(q_r, k, w_r, rows=S, row0=0, n_cols=T,
                         emit=(lo, cand_val, cand_idx, count), **vis)
        out[f"emit {S}x64K.tuned"] = ms(launch)
        for config in configs:
            isc._tuned_emit = triton.autotune(configs=[config], key=isc._KEY,
                                              reset_to_zero=["count_ptr"])(isc.index_scores_kernel)
            try:
                out[f"emit {S}x64K.{config}"] = ms(launch)
            except Exception as error:  # a config that does not fit the card (shared memory)
                print(f"emit {S}x64K {config}: {type(error).__name__}", flush=True)
            finally:
                isc._tuned_emit = default
        del q_r, k, w_r
        torch.cuda.empty_cache()
    for key, config in default.cache.items():
        print(f"index_scores EMIT best config for {key[:5]}: {config}", flush=True)


SECTIONS = dict(topk=topk_alone, decode=decode, rerank=rerank, ranges=ranges_against_causal,
                scoring=scoring, append=append_cost, paged=paged_decode, hier=hier_stages,
                decode_tiles=decode_tiles, host=host_time,
                masked=masked, wide=wide_rows, router=router, fp8=fp8_against_bf16,
                sampled=sampled_scores, emit_tiles=emit_tiles)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections, of {', '.join(SECTIONS)}")
    args = parser.parse_args()
    out = {}
    for name in args.only.split(","):
        SECTIONS[name.strip()](out)
        if name.strip() == "topk":
            print("compact_rows best config:", compact_rows_tuned.best_config, flush=True)
        torch.cuda.empty_cache()
    for tuner in (ct._tuned, ct._tuned_wide):
        for key, config in tuner.cache.items():
            print(f"candidate_topk best config for {key[:5]}: {config}", flush=True)
    for key, value in out.items():
        print(f"{key:60s} {value:9.3f}", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    # Kernels called directly launch plainly, as inside the ops (wrap_triton's dispatch costs
    # host time per launch and is only needed while a graph is traced).
    with set_wrap_triton_enabled(False):
        main()
