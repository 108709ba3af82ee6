"""Checks every Triton kernel of the misa ops at real shapes in bf16 on a CUDA device against the
chunked fp32 torch implementations (the same math without the kernels), comparing selections by
the exact scores of the keys they chose, never by index order. Cases: 1024 x 64K causal,
ragged batches, T not a multiple of any block, T < k_top, full causal with -inf tails, NaN
inputs, decode, the router, the re-rank, HISA's block filter, top-k alone, and decode over a
paged key cache.

    python bench/check_gpu.py [--out results.json]

FP8 e4m3 q and k with dequantization scales (check_fp8) run the same checks on the dequantized
values. Exits 1 if any check fails."""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import misa_compile  # noqa: F401  (registers the ops and their CUDA kernels)
from misa_compile.kernels import reference, torch_impl
from misa_compile.kernels.triton.launch.route_heads import route_heads as paged_route_heads
from misa_compile.kernels.triton.selection.row_topk import topk_rows
from workloads import make_inputs, true_scores

ops = torch.ops.misa
TOL = 2e-3
results = []


def selection_report(q, k, w, indices, values, ref_values, heads=None, scale=1.0):
    """Errors of a selection: returned values vs the exact scores of the chosen keys, and the
    chosen keys' exact scores vs the reference's top values (sorted); finite counts; NaN;
    index range; duplicate finite keys."""
    T = k.shape[1]
    finite = torch.isfinite(values)
    exact = true_scores(q, k, w, indices, scale, heads)
    ref_sorted = ref_values.sort(-1, descending=True).values
    ours_sorted = torch.where(finite, exact, float("-inf")).sort(-1, descending=True).values
    ref_finite = torch.isfinite(ref_sorted)
    magnitude = ref_sorted[ref_finite].abs().max().clamp_min(1e-30) if ref_finite.any() else 1.0
    both = ref_finite & torch.isfinite(ours_sorted)
    value_err = ((values - exact).abs() * finite).nan_to_num(0).max() / magnitude
    select_err = ((ours_sorted - ref_sorted).abs() * both).nan_to_num(0).max() / magnitude
    keys_sorted = torch.where(finite, indices, -1 - torch.arange(indices.shape[-1],
                                                                 device=indices.device)).sort(-1).values
    duplicates = int(((keys_sorted[..., 1:] == keys_sorted[..., :-1]) & (keys_sorted[..., 1:] >= 0)).sum())
    return dict(value_err=float(value_err), select_err=float(select_err),
                count_mismatch=int((finite.sum(-1) != ref_finite.sum(-1)).sum()),
                nan=int(torch.isnan(values).sum()),
                out_of_range=int(((indices < 0) | (indices >= T)).sum()),
                duplicates=duplicates,
                k=int(values.shape[-1]))


def record(name, report, started, extra_ok=True):
    ok = (extra_ok and report.get("value_err", 0) < TOL and report.get("select_err", 0) < TOL
          and report.get("count_mismatch", 0) == 0 and report.get("nan", 0) == 0
          and report.get("out_of_range", 0) == 0 and report.get("duplicates", 0) == 0)
    report.update(name=name, ok=bool(ok), seconds=round(time.time() - started, 2))
    results.append(report)
    print(("PASS " if ok else "FAIL ") + name + " " +
          json.dumps({k: v for k, v in report.items() if k not in ("name", "ok")}), flush=True)


def ragged_ranges(batch, queries, T, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    start = torch.randint(0, T // 3, (batch, queries), generator=gen, device="cuda")
    length = torch.randint(0, T, (batch, queries), generator=gen, device="cuda")
    return start, (start + length).clamp(max=T + 5)


def check_dense(name, batch, queries, T, heads=64, k_top=2048, causal=True, ragged=False,
                seed=0, scale=0.088):
    started = time.time()
    q, k, w = make_inputs(batch, queries, T, heads, seed=seed)
    ks, ke = ragged_ranges(batch, queries, T, seed) if ragged else (None, None)
    values, indices = ops.dense_topk(q, k, w, k_top, scale, causal, ks, ke)
    ref_values, _ = torch_impl.dense_topk(q, k, w, k_top, scale, causal, ks, ke, None, 16)
    record(name, selection_report(q, k, w, indices, values, ref_values, scale=scale), started)


def check_routed(name, batch, queries, T, heads=64, active=8, k_top=2048, ragged=False, seed=1):
    started = time.time()
    q, k, w = make_inputs(batch, queries, T, heads, seed=seed)
    ks, ke = ragged_ranges(batch, queries, T, seed) if ragged else (None, None)
    chosen = ops.route_heads(q, k, w, active, 1024, "score", True, ks, ke)
    # Router: the chosen heads' exact router scores must be the top-h scores (ties aside).
    r = reference.router_scores(q, k, w, 1024, True, ks, ke)
    ours = r.gather(-1, chosen).sort(-1).values
    best = r.topk(active, dim=-1).values.sort(-1).values
    router_err = float(((ours - best).abs() / best.abs().clamp_min(1e-9)).max())
    distinct = bool((chosen.sort(-1).values.diff(dim=-1) > 0).all()) if active > 1 else True
    record(name + " router", dict(router_rel_err=router_err, distinct=distinct), started,
           extra_ok=router_err < 1e-4 and distinct)
    started = time.time()
    values, indices = ops.routed_topk(q, k, w, chosen, k_top, 1.0, True, ks, ke)
    ref_values, _ = torch_impl.routed_topk(q, k, w, chosen, k_top, 1.0, True, ks, ke, None, 32)
    record(name + " routed_topk",
           selection_report(q, k, w, indices, values, ref_values, heads=chosen), started)
    return q, k, w, chosen, ks, ke


def check_rerank(name, q, k, w, chosen, ks, ke, n_cand=8192, k_top=2048):
    started = time.time()
    _, cand = ops.routed_topk(q, k, w, chosen, n_cand, 1.0, True, ks, ke)
    values, indices = ops.rerank_topk(q, k, w, cand, k_top, 1.0, True, ks, ke)
    ref_values, _ = torch_impl.rerank_topk(q, k, w, cand, k_top, 1.0, True, ks, ke, None, 0)
    record(name, selection_report(q, k, w, indices, values, ref_values), started)


def check_hisa(name, batch, queries, T, seed=3):
    started = time.time()
    q, k, w = make_inputs(batch, queries, T, 64, seed=seed)
    ours = ops.hisa_candidates(q, k, w, 128, 64, True)
    ref = torch_impl.hisa_candidates(q, k, w, 128, 64, True, None, None, None, 0)
    # Compare the kept blocks by their exact block scores (bf16 block means may swap near-ties).
    kbar = reference.pooled_keys(k, 128)
    beta = torch.einsum("bshd,bnd->bshn", q.float(), kbar).relu_()
    beta = torch.einsum("bshn,bsh->bsn", beta, w.float())
    def kept_scores(ids):
        blocks = ids[..., ::128].clamp_min(0) // 128
        return beta.gather(-1, blocks).sort(-1).values
    a, b = kept_scores(ours), kept_scores(ref)
    finite = torch.isfinite(a) & torch.isfinite(b)
    err = float(((a - b).abs() * finite).max() / b[finite].abs().max())
    same_shape = ours.shape == ref.shape
    record(name + " blocks", dict(block_score_err=err, same_shape=same_shape), started,
           extra_ok=err < 2e-2 and same_shape)
    started = time.time()
    values, indices = ops.rerank_topk(q, k, w, ours, 2048, 1.0, True)
    ref_values, _ = torch_impl.rerank_topk(q, k, w, ours, 2048, 1.0, True, None, None, None, 0)
    record(name + " refine", selection_report(q, k, w, indices, values, ref_values), started)


def check_decode(name, batch, T, active=None, seed=4):
    started = time.time()
    q, k, w = make_inputs(batch, 1, T, 64, seed=seed)
    lengths = torch.randint(1, T + 1, (batch, 1), device="cuda")
    lengths[0, 0] = T
    if batch > 1:
        lengths[1, 0] = 100  # shorter than k_top: -inf tail
    ks = torch.zeros_like(lengths)
    heads = None
    if active:
        heads = ops.route_heads(q, k, w, active, 1024, "score", False, ks, lengths)
        values, indices = ops.routed_topk(q, k, w, heads, 2048, 1.0, False, ks, lengths)
        ref_values, _ = torch_impl.routed_topk(q, k, w, heads, 2048, 1.0, False, ks, lengths,
                                               None, 0)
    else:
        values, indices = ops.dense_topk(q, k, w, 2048, 1.0, False, ks, lengths)
        ref_values, _ = torch_impl.dense_topk(q, k, w, 2048, 1.0, False, ks, lengths, None, 0)
    record(name, selection_report(q, k, w, indices, values, ref_values, heads=heads), started)


def check_nan(name, seed=5):
    started = time.time()
    q, k, w = make_inputs(1, 256, 20000, 64, seed=seed)
    q[0, 7] = float("nan")
    k[0, 123] = float("nan")
    values, indices = ops.dense_topk(q, k, w, 2048, 1.0, True)
    ref_values, _ = torch_impl.dense_topk(q, k, w, 2048, 1.0, True, None, None, None, 16)
    q0 = torch.nan_to_num(q)
    k0 = torch.nan_to_num(k)
    report = selection_report(q0, k0, w, indices, values, ref_values)
    # The NaN query's row is all hidden; key 123 is never selected.
    picked_nan_key = int(((indices == 123) & torch.isfinite(values)).sum())
    report.update(nan_row_finite=int(torch.isfinite(values[0, 7]).sum()), picked_nan_key=picked_nan_key)
    record(name, report, started, extra_ok=report["nan_row_finite"] == 0 and picked_nan_key == 0)


def check_topk_alone(name, rows, T, k_top=2048, ties=False, seed=6):
    started = time.time()
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(1, rows, T, generator=gen, device="cuda")
    if ties:
        x = (x * 4).round()
    values = torch.empty(1, rows, k_top, device="cuda")
    indices = torch.empty(1, rows, k_top, dtype=torch.int64, device="cuda")
    topk_rows(x, k_top, values, indices)
    ref = x.topk(k_top, dim=-1).values
    exact_values = bool(torch.equal(values.sort(-1).values, ref.sort(-1).values))
    gathered = bool(torch.equal(x.gather(-1, indices).sort(-1).values, ref.sort(-1).values))
    distinct = bool((indices.sort(-1).values.diff(dim=-1) > 0).all())
    record(name, dict(exact_values=exact_values, gathered=gathered, distinct=distinct), started,
           extra_ok=exact_values and gathered and distinct)


def check_paged(name, batch, T, active=0, page=64, seed=7):
    """paged_decode_topk over a shuffled page table holding the same keys as a contiguous k:
    checked against the torch implementation on k (MISA: under the heads of the op's paged
    router, whose choice is checked by tests/gpu/test_paged_gpu.py)."""
    started = time.time()
    q, k, w = make_inputs(batch, 1, T, 64, seed=seed)
    pages = T // page
    gen = torch.Generator(device="cuda").manual_seed(seed)
    lengths = torch.randint(1, T + 1, (batch,), generator=gen, device="cuda")
    lengths[0] = T
    if batch > 1:
        lengths[1] = 100  # shorter than k_top: -inf tail
    table = torch.randperm(batch * pages, generator=gen, device="cuda").view(batch, pages)
    k_cache = torch.empty(batch * pages, page, k.shape[2], dtype=k.dtype, device="cuda")
    k_cache[table] = k.view(batch, pages, page, -1)
    table = table.int()
    values, indices = ops.paged_decode_topk(q[:, 0], k_cache, w[:, 0], table, lengths, 2048,
                                            active, 1024)
    key_end = lengths[:, None]
    ks = torch.zeros_like(key_end)
    heads = None
    if active:
        heads = paged_route_heads(q, k_cache, w, active, 1024, False, ks, key_end,
                                  block_table=table, seq_lens=lengths)
        ref_values, _ = torch_impl.routed_topk(q, k, w, heads, 2048, 1.0, False, ks, key_end,
                                               None, 0)
    else:
        ref_values, _ = torch_impl.dense_topk(q, k, w, 2048, 1.0, False, ks, key_end, None, 0)
    record(name, selection_report(q, k, w, indices[:, None], values[:, None], ref_values,
                                  heads=heads), started)


def fp8_inputs(batch, queries, T, seed):
    """make_inputs quantized to FP8 e4m3 per row (q per token and head, k per token) after
    per-row gains of 2^-4..2^4, so that the scales matter: (q8, q_scale, k8, k_scale, w)."""
    q, k, w = make_inputs(batch, queries, T, 64, seed=seed)
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def quantize(x):
        gain = torch.exp2(torch.randint(-4, 5, x.shape[:-1], generator=gen, device="cuda").float())
        x = x.float() * gain[..., None]
        scale = (x.abs().amax(-1) / torch.finfo(torch.float8_e4m3fn).max).clamp_min(1e-8)
        return (x / scale[..., None]).to(torch.float8_e4m3fn), scale

    return (*quantize(q), *quantize(k), w)


def check_fp8(name, batch, queries, T, causal=True, ragged=False, active=8, seed=8):
    """FP8 q, k with scales: dense, router, routed and (queries > 1) misa_hier re-rank against
    the torch implementation on the same inputs, scored on the dequantized q, k."""
    started = time.time()
    q8, q_scale, k8, k_scale, w = fp8_inputs(batch, queries, T, seed)
    q, k = q8.float() * q_scale[..., None], k8.float() * k_scale[..., None]
    ks, ke = ragged_ranges(batch, queries, T, seed) if ragged else (None, None)
    vis, scales = (causal, ks, ke), dict(q_scale=q_scale, k_scale=k_scale)
    values, indices = ops.dense_topk(q8, k8, w, 2048, 0.088, *vis, **scales)
    ref_values, _ = torch_impl.dense_topk(q8, k8, w, 2048, 0.088, *vis, None, 16, q_scale, k_scale)
    record(name + " dense", selection_report(q, k, w, indices, values, ref_values, scale=0.088),
           started)
    started = time.time()
    chosen = ops.route_heads(q8, k8, w, active, 1024, "score", *vis, **scales)
    r = reference.router_scores(q8, k8, w, 1024, *vis, **scales)
    best = r.topk(active, dim=-1).values.sort(-1).values
    router_err = float(((r.gather(-1, chosen).sort(-1).values - best).abs()
                        / best.abs().clamp_min(1e-9)).max())
    record(name + " router", dict(router_rel_err=router_err), started, extra_ok=router_err < 1e-4)
    started = time.time()
    values, indices = ops.routed_topk(q8, k8, w, chosen, 2048, 1.0, *vis, **scales)
    ref_values, _ = torch_impl.routed_topk(q8, k8, w, chosen, 2048, 1.0, *vis, None, 32, q_scale,
                                           k_scale)
    record(name + " routed_topk",
           selection_report(q, k, w, indices, values, ref_values, heads=chosen), started)
    if queries == 1:
        return
    started = time.time()
    _, cand = ops.routed_topk(q8, k8, w, chosen, 8192, 1.0, *vis, **scales)
    values, indices = ops.rerank_topk(q8, k8, w, cand, 2048, 1.0, *vis, **scales)
    ref_values, _ = torch_impl.rerank_topk(q8, k8, w, cand, 2048, 1.0, *vis, None, 0, q_scale,
                                           k_scale)
    record(name + " misa_hier rerank", selection_report(q, k, w, indices, values, ref_values),
           started)


def check_misa():
    state = check_routed("misa 1024x65536", 1, 1024, 65536)
    check_rerank("misa_hier rerank 1024x65536", *state)
    check_routed("misa ragged B=2 256x70001", 2, 256, 70001, ragged=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--only", default=None, help="run the checks whose name contains this")
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    named = [
        ("topk", lambda: check_topk_alone("topk alone 512x65536", 512, 65536)),
        ("topk ties", lambda: check_topk_alone("topk alone ties 256x70001", 256, 70001, ties=True)),
        ("dense", lambda: check_dense("dense 1024x65536 causal", 1, 1024, 65536)),
        ("dense ragged", lambda: check_dense("dense ragged B=3 300x70001", 3, 300, 70001,
                                             causal=False, ragged=True)),
        ("dense H32", lambda: check_dense("dense H=32 512x16384", 1, 512, 16384, heads=32)),
        ("dense short", lambda: check_dense("dense T<k_top 64x1500", 2, 64, 1500)),
        ("dense causal", lambda: check_dense("dense full causal 5000", 1, 5000, 5000)),
        ("NaN", lambda: check_nan("dense NaN inputs")),
        ("decode", lambda: check_decode("decode dense B=8 T=70001", 8, 70001)),
        ("decode routed", lambda: check_decode("decode routed B=8 T=70001", 8, 70001, active=8)),
        ("hisa", lambda: check_hisa("hisa 512x65536", 1, 512, 65536)),
        ("misa", lambda: check_misa()),
        ("fp8", lambda: check_fp8("fp8 1024x65536 causal", 1, 1024, 65536)),
        ("fp8 ragged", lambda: check_fp8("fp8 ragged B=2 256x70001", 2, 256, 70001, causal=False,
                                         ragged=True)),
        ("fp8 decode", lambda: check_fp8("fp8 decode B=8 T=70001", 8, 1, 70001, causal=False,
                                         ragged=True)),
        ("paged", lambda: check_paged("paged decode dense B=64 T=65536", 64, 65536)),
        ("paged routed", lambda: check_paged("paged decode routed B=64 T=65536", 64, 65536,
                                             active=8)),
    ]
    for key, case in named:
        if args.only and args.only not in key:
            continue
        try:
            case()
        except Exception as error:  # a crash is a failed check; keep checking the rest
            import traceback
            traceback.print_exc()
            results.append(dict(name=key, ok=False, error=repr(error)))
            print(f"FAIL {error!r}", flush=True)
    failed = [r["name"] for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)}/{len(results)} checks passed" +
          (f"; failed: {failed}" if failed else ""), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(), results=results), fh, indent=1)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
