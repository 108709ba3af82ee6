"""Benchmark of the indexer variants on one CUDA card: plain torch (the Hugging Face
formulation, chunked), torch.compile of it, our dense Triton kernel, MISA (h=8),
MISA-hierarchical and HISA, dense / MISA on FP8 e4m3 inputs with per-token scales, dense /
MISA given the causal visibility as a mask tensor (causal=False plus a [B, 1, S, T] mask sliced
[:, 0], bool as transformers builds it for sdpa, additive bf16 0 / finfo.min as for eager
attention; prefill shapes with at most 2^30 mask entries), and (decode) dense / MISA over a
paged key cache (MISA also with the router's pooled keys kept between steps: "paged cached"),
bf16 and FP8 (dense, and MISA with cached pooled keys: the serving configuration), and each
call of dense / MISA (contiguous, FP8 and paged) at decode and at up to 1024 x 64K query-key
pairs (short prefill, whose plain calls are partly host-bound) once more replayed
from a CUDA graph ("graph" rows: no host work per call; the gap to the plain row is the host's
launch cost, since no op synchronises with the host), over the shapes of PERFORMANCE.md; plus
top-k alone against torch.topk. Prints one table last (card named) and writes the full JSON.

    python bench/bench_indexer.py [--quick] [--only LABELS] [--variants NAMES] [--no-torch]
                                  [--topk-only] [--out FILE]

Columns: ms (median, CUDA events), useful TFLOP/s (the FLOPs the variant's algorithm needs on
visible pairs, over its time), speedup vs our dense kernel, recall of the dense selection, and
peak extra GPU memory of one call. The FP8 rows' recall is against the bf16 dense selection (it
includes the quantization's effect). Inputs are random bf16 (isotropic: routing recall on them
is a floor, not the quality on real indexers)."""
from __future__ import annotations

import argparse
import json
import math
import statistics

import torch
from torch._library.triton import set_wrap_triton_enabled
import triton

import misa_compile  # noqa: F401
from misa_compile.config import MisaConfig
from misa_compile.kernels import indexer_topk
from misa_compile.kernels.triton.scoring.index_scores import _tuned_emit as index_scores_emit
from misa_compile.kernels.triton.scoring.index_scores import _tuned_full as index_scores_full
from misa_compile.kernels.triton.selection.compact_rows import _tuned_kernel as compact_rows_tuned
from misa_compile.kernels.triton.selection.row_topk import topk_rows
from workloads import hf_indexer_topk, make_inputs, quantize_fp8, recall, visible_pairs

K_TOP, ACTIVE, ROUTER_BLOCK, N_CAND, HISA_BLOCK, HISA_M = 2048, 8, 1024, 8192, 128, 64
SCALE = 128 ** -0.5
VARIANTS = {
    "dense": MisaConfig(variant="dense"),
    "misa": MisaConfig(variant="misa", active_heads=ACTIVE, block_size=ROUTER_BLOCK),
    "misa_hier": MisaConfig(variant="misa_hier", active_heads=ACTIVE, block_size=ROUTER_BLOCK,
                            candidates=N_CAND),
    "hisa": MisaConfig(variant="hisa", hisa_block=HISA_BLOCK, hisa_blocks=HISA_M),
}
FP8_VARIANTS = ("dense", "misa")
PAGED_VARIANTS = ("dense", "misa")
PAGE = 64
MASK_VARIANTS = ("dense", "misa")
GRAPH_VARIANTS = ("dense", "misa", "dense fp8", "misa fp8", "dense paged", "misa paged",
                  "misa paged cached", "dense paged fp8", "misa paged cached fp8")
# Graph rows for decode and short prefill (1024 x 64K), whose plain calls are partly host-bound.
GRAPH_PAIRS = 1024 * 65536
# Mask rows only where the mask stays small enough to sit beside the inputs (1 GiB bool).
MASK_ENTRIES = 1 << 30


def shapes(quick: bool):
    """(label, B, S, T, H, run plain torch, run torch.compile)."""
    prefill = [("1024x64K", 1, 1024, 65536, 64, True, True),
               ("8192x64K", 1, 8192, 65536, 64, True, True),
               ("1024x64K H32", 1, 1024, 65536, 32, True, False)]
    if quick:
        return prefill
    return prefill + [
        ("8192x64K H32", 1, 8192, 65536, 32, False, False),
        ("8192x16K", 1, 8192, 16384, 64, True, False),
        ("8192x32K", 1, 8192, 32768, 64, True, False),
        ("causal 8K", 1, 8192, 8192, 64, True, False),
        ("causal 32K", 1, 32768, 32768, 64, True, False),
        ("causal 64K", 1, 65536, 65536, 64, False, False),
        ("causal 128K", 1, 131072, 131072, 64, False, False),
        ("decode 1x4K", 1, 1, 4096, 64, True, False),
        ("decode 1x64K", 1, 1, 65536, 64, True, False),
        ("decode 1x128K", 1, 1, 131072, 64, True, False),
        ("decode 64x4K", 64, 1, 4096, 64, True, False),
        ("decode 64x64K", 64, 1, 65536, 64, True, False),
        ("decode 64x128K", 64, 1, 131072, 64, True, False),
    ]


def time_call(fn) -> float:
    """Median ms of fn after a warm-up call; slow calls (> 100 ms) are timed 3 times."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    first = start.elapsed_time(end)
    if first > 100:
        runs = [first]
        for _ in range(2):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            runs.append(start.elapsed_time(end))
        return statistics.median(runs)
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def peak_extra_gib(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 30


def useful_flops(variant: str, batch, queries, keys, heads, dim=128) -> float:
    pairs = visible_pairs(batch, queries, keys)
    per_pair = 2 * dim
    router = per_pair * heads * batch * queries * math.ceil(keys / ROUTER_BLOCK)
    if variant in ("torch", "compile", "dense"):
        return per_pair * heads * pairs
    if variant == "misa":
        return per_pair * ACTIVE * pairs + router
    if variant == "misa_hier":
        return per_pair * ACTIVE * pairs + router + per_pair * heads * batch * queries * N_CAND
    blocks = per_pair * heads * batch * queries * math.ceil(keys / HISA_BLOCK)
    return blocks + per_pair * heads * batch * queries * HISA_M * HISA_BLOCK


def rotating(inputs_list):
    """Cycles through input sets so that repeated calls do not all hit L2."""
    state = {"i": 0}

    def next_inputs():
        state["i"] = (state["i"] + 1) % len(inputs_list)
        return inputs_list[state["i"]]
    return next_inputs


def bench_shape(label, batch, queries, keys, heads, run_torch, run_compile, variants=None):
    copies = max(1, min(8, math.ceil(200 * 2 ** 20 / (batch * keys * 128 * 2))))
    sets = [make_inputs(batch, queries, keys, heads, seed=s) for s in range(copies)]
    fp8_sets = [(*quantize_fp8(q, k), w) for q, k, w in sets]
    rows = []
    dense_values, dense_indices = indexer_topk(*sets[0], K_TOP, VARIANTS["dense"], scale=SCALE)
    torch.cuda.synchronize()
    # Each row's call on rotating input sets (timed) and on the first set (its recall, and the
    # call a graph captures).
    rows_calls = {name: (lambda inputs, c=config: indexer_topk(*inputs, K_TOP, c, scale=SCALE),
                         sets) for name, config in VARIANTS.items()}
    for name in FP8_VARIANTS:
        rows_calls[f"{name} fp8"] = (lambda inputs, c=VARIANTS[name]: fp8_call(inputs, c),
                                     fp8_sets)
    if queries == 1:
        paged = [paged_inputs(*inputs) for inputs in sets]
        paged_fp8 = [paged_inputs(q8, k8, w, q_scale, k_scale)
                     for q8, k8, q_scale, k_scale, w in fp8_sets]
        for name in PAGED_VARIANTS:
            rows_calls[f"{name} paged"] = (lambda inputs, c=VARIANTS[name]: paged_call(inputs, c),
                                           paged)
        rows_calls["dense paged fp8"] = (lambda inputs: paged_call(inputs, VARIANTS["dense"]),
                                         paged_fp8)
        # The router's pooled keys kept between steps (computed once here, outside the timing).
        for suffix, inputs_list in (("", paged), (" fp8", paged_fp8)):
            rows_calls[f"misa paged cached{suffix}"] = (
                lambda inputs: paged_call(inputs, VARIANTS["misa"]),
                [(*inputs, pooled_for(inputs)) for inputs in inputs_list])
    small = 1 < queries and batch * queries * keys <= MASK_ENTRIES
    masks = causal_masks(batch, queries, keys) if small else {}
    for kind, mask in masks.items():
        for name in MASK_VARIANTS:
            rows_calls[f"{name} {kind}"] = (
                lambda inputs, c=VARIANTS[name], m=mask: masked_call(inputs, c, m), sets)
    calls = {name: (lambda call=call, pick=rotating(inputs): call(pick()))
             for name, (call, inputs) in rows_calls.items()}
    fixed = {name: (lambda call=call, inputs=inputs[0]: call(inputs))
             for name, (call, inputs) in rows_calls.items()}
    pick = rotating(sets)
    if run_torch:
        calls = {"torch": lambda: hf_indexer_topk(*pick(), K_TOP, SCALE), **calls}
    if run_compile:
        calls = {"compile": lambda: hf_indexer_topk(*pick(), K_TOP, SCALE, compiled=True),
                 **calls}
    if variants is not None:
        calls = {name: call for name, call in calls.items() if name.split(" ")[0] in variants}
    if batch * queries * keys <= GRAPH_PAIRS:
        for name in [name for name in GRAPH_VARIANTS if name in calls]:
            replay, outputs = captured(fixed[name])
            calls[f"{name} graph"] = replay
            # The static outputs of one replay on the first set.
            fixed[f"{name} graph"] = lambda replay=replay, outputs=outputs: (replay(), outputs)[1]
    for name, call in calls.items():
        try:
            ms = time_call(call)
            peak = peak_extra_gib(call)
            rec = None
            if name not in ("torch", "compile"):
                values, indices = fixed[name]()
                rec = recall(indices, values, dense_indices, dense_values)
                del values, indices
            flops = useful_flops(name.split(" ")[0], batch, queries, keys, heads)
            rows.append(dict(shape=label, B=batch, S=queries, T=keys, H=heads, variant=name,
                             ms=ms, tflops=flops / ms / 1e9, recall=rec, peak_gib=peak))
        except torch.OutOfMemoryError as error:
            rows.append(dict(shape=label, B=batch, S=queries, T=keys, H=heads, variant=name,
                             error=f"out of memory: {error}"[:200]))
        torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), flush=True)
    dense_ms = next((r["ms"] for r in rows if r["variant"] == "dense" and "ms" in r), None)
    for r in rows:
        if dense_ms and "ms" in r:
            r["vs_dense"] = dense_ms / r["ms"]
    return rows


def captured(call):
    """(replay, outputs): `call` captured once in a CUDA graph on its fixed inputs (warmed up on
    a side stream first, as torch.cuda.graph asks, so that compilation and autotuning happen
    outside the capture), and the graph's static outputs."""
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = call()
    return graph.replay, outputs


def causal_masks(batch, queries, keys):
    """The end-aligned causal visibility as transformers hands it to the indexer: a
    [B, 1, S, T] mask sliced [:, 0], bool (sdpa) and additive bf16 (eager attention)."""
    pos = torch.arange(keys, device="cuda")
    last = keys - queries + torch.arange(queries, device="cuda")
    visible = (pos[None, :] <= last[:, None]).expand(batch, 1, queries, keys)
    additive = torch.zeros(batch, 1, queries, keys, dtype=torch.bfloat16, device="cuda")
    additive.masked_fill_(~visible, torch.finfo(torch.bfloat16).min)
    return {"bool mask": visible.contiguous()[:, 0], "add mask": additive[:, 0]}


def masked_call(inputs, config, mask):
    return indexer_topk(*inputs, K_TOP, config, scale=SCALE, causal=False, mask=mask)


def fp8_call(inputs, config):
    q8, k8, q_scale, k_scale, w = inputs
    return indexer_topk(q8, k8, w, K_TOP, config, scale=SCALE, q_scale=q_scale, k_scale=k_scale)


def paged_inputs(q, k, w, q_scale=None, k_scale=None):
    """Decode inputs over a paged cache (k's pages, and k_scale's with FP8 keys, in shuffled
    order, every sequence full): (q, k_cache, w, block_table, seq_lens, q_scale, k_scale)."""
    batch, keys, dim = k.shape
    pages = keys // PAGE
    order = torch.randperm(batch * pages, device=k.device)
    block_table = order.view(batch, pages).int()
    seq_lens = torch.full((batch,), keys, dtype=torch.int32, device=k.device)
    paged_scale = None if k_scale is None else shuffled_pages(k_scale, order)
    return (q[:, 0], shuffled_pages(k, order), w[:, 0], block_table, seq_lens,
            None if q_scale is None else q_scale[:, 0], paged_scale)


def shuffled_pages(x, order):
    """x [B, T, ...] as pages [B * T / PAGE, PAGE, ...], page i of the flat sequence stored at
    order[i]. Moved as integers of the same width: index_put has no FP8 kernel."""
    raw = {1: torch.int8, 2: torch.int16, 4: torch.int32}[x.element_size()]
    pages = x.view(raw).reshape(order.numel(), PAGE, *x.shape[2:])
    out = torch.empty_like(pages)
    out[order] = pages
    return out.view(x.dtype)


def pooled_for(inputs):
    _, k_cache, _, block_table, seq_lens, _, k_scale = inputs
    return torch.ops.misa.paged_pooled_keys(k_cache, block_table, seq_lens, ROUTER_BLOCK,
                                            k_scale=k_scale)


def paged_call(inputs, config):
    """paged_decode_topk on (q, k_cache, w, block_table, seq_lens, q_scale, k_scale[, pooled
    keys])."""
    q, k_cache, w, block_table, seq_lens, q_scale, k_scale, *pooled = inputs
    heads = config.active_heads if config.variant == "misa" else 0
    values, indices = torch.ops.misa.paged_decode_topk(q, k_cache, w, block_table, seq_lens,
                                                       K_TOP, heads, config.block_size, SCALE,
                                                       q_scale=q_scale, k_scale=k_scale,
                                                       pooled_keys=pooled[0] if pooled else None)
    return values[:, None], indices[:, None]


def bench_topk_alone():
    rows = []
    for n_rows, width in ((1024, 65536), (8192, 65536), (2048, 131072), (64, 131072)):
        x = torch.randn(1, n_rows, width, device="cuda")
        values = torch.empty(1, n_rows, K_TOP, device="cuda")
        indices = torch.empty(1, n_rows, K_TOP, dtype=torch.int64, device="cuda")
        # A direct call launches plainly, as inside the op (wrap_triton's dispatch, needed only
        # while a graph is traced, costs host time per launch).
        with set_wrap_triton_enabled(False):
            ours = time_call(lambda: topk_rows(x, K_TOP, values, indices))
        ref = time_call(lambda: x.topk(K_TOP, dim=-1, sorted=False))
        ref_bf16 = time_call(lambda: x.to(torch.bfloat16).topk(K_TOP, dim=-1, sorted=False))
        # Few rows make plain calls host-bound: both sides again from a CUDA graph (GPU time).
        with set_wrap_triton_enabled(False):
            ours_replay, _ = captured(lambda: topk_rows(x, K_TOP, values, indices))
        ref_replay, _ = captured(lambda: x.topk(K_TOP, dim=-1, sorted=False))
        ours_graph, ref_graph = time_call(ours_replay), time_call(ref_replay)
        expected = x.topk(K_TOP, dim=-1).values.sort(-1).values
        same = bool(torch.equal(values.sort(-1).values, expected))
        rows.append(dict(rows=n_rows, width=width, ours_ms=ours, torch_fp32_ms=ref,
                         torch_bf16_ms=ref_bf16, speedup=ref / ours, ours_graph_ms=ours_graph,
                         torch_fp32_graph_ms=ref_graph, graph_speedup=ref_graph / ours_graph,
                         exact=same))
        print(json.dumps(rows[-1]), flush=True)
        del x
        torch.cuda.empty_cache()
    return rows


def card_ceilings():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    matmul_ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    src = torch.randn(2 ** 28, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return dict(bf16_matmul_tflops=2 * 8192 ** 3 / matmul_ms / 1e9,
                copy_tb_s=2 * src.numel() * 4 / copy_ms / 1e9)


def table(device, ceilings, rows, topk_rows_):
    lines = [f"card: {device}; bf16 matmul {ceilings['bf16_matmul_tflops']:.0f} TFLOP/s; "
             f"device copy {ceilings['copy_tb_s']:.2f} TB/s (read+write)",
             "| shape | variant | ms | useful TFLOP/s | vs dense | recall | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "ms" not in r:
            lines.append(f"| {r['shape']} | {r['variant']} | {r.get('error', '')} | | | | |")
            continue
        rec = "" if r["recall"] is None else f"{r['recall']:.3f}"
        lines.append(f"| {r['shape']} | {r['variant']} | {r['ms']:.3f} | {r['tflops']:.0f} | "
                     f"{r.get('vs_dense', float('nan')):.2f}x | {rec} | {r['peak_gib']:.2f} |")
    lines += ["", "| top-k k=2048 fp32 rows x width | ours ms | torch.topk fp32 ms | "
              "torch.topk bf16 ms | speedup vs fp32 | graph: ours ms | graph: torch fp32 ms "
              "| graph speedup | exact |", "|---|---|---|---|---|---|---|---|---|"]
    for r in topk_rows_:
        lines.append(f"| {r['rows']} x {r['width']} | {r['ours_ms']:.3f} "
                     f"| {r['torch_fp32_ms']:.3f} | {r['torch_bf16_ms']:.3f} "
                     f"| {r['speedup']:.2f}x | {r['ours_graph_ms']:.3f} "
                     f"| {r['torch_fp32_graph_ms']:.3f} | {r['graph_speedup']:.2f}x "
                     f"| {r['exact']} |")
    return "\n".join(lines)


def tuned_configs() -> dict:
    """The config each autotuned kernel picked, per tuning key, in this process (a key holds
    no row count, so the first shape to reach a key decides its config for the later ones)."""
    tuners = {"index_scores FULL": index_scores_full, "index_scores EMIT": index_scores_emit,
              "compact_rows": compact_rows_tuned}
    return {name: {str(key): str(config) for key, config in tuner.cache.items()}
            for name, tuner in tuners.items()}


def write_results(path, device, ceilings, topk, rows):
    with open(path, "w") as fh:
        json.dump(dict(device=device, ceilings=ceilings, topk=topk, rows=rows,
                       tuned=tuned_configs()), fh, indent=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the 64K prefill shapes")
    parser.add_argument("--only", default=None,
                        help="comma-separated labels (e.g. '8192x64K,decode 64x64K') to run")
    parser.add_argument("--no-torch", action="store_true",
                        help="skip the plain torch and torch.compile baselines")
    parser.add_argument("--variants", default=None,
                        help="comma-separated variants to time (e.g. 'dense,misa'; their fp8, "
                             "paged and mask rows come along)")
    parser.add_argument("--topk-only", action="store_true",
                        help="only the top-k alone rows (ours against torch.topk)")
    parser.add_argument("--out", default="bench_indexer.json")
    args = parser.parse_args()
    device = torch.cuda.get_device_name()
    ceilings = card_ceilings()
    print(json.dumps(ceilings), flush=True)
    topk = bench_topk_alone()
    rows = []
    if args.topk_only:
        write_results(args.out, device, ceilings, topk, rows)
        print(table(device, ceilings, rows, topk), flush=True)
        return
    wanted = None if args.only is None else {label.strip() for label in args.only.split(",")}
    for spec in shapes(args.quick):
        if wanted is not None and spec[0] not in wanted:
            continue
        if args.no_torch:
            spec = spec[:5] + (False, False)
        rows += bench_shape(*spec, variants=None if args.variants is None
                            else {v.strip() for v in args.variants.split(",")})
        write_results(args.out, device, ceilings, topk, rows)
    print(table(device, ceilings, rows, topk), flush=True)


if __name__ == "__main__":
    main()
