"""Context-parallel indexer: one GPU holding all keys against W GPUs holding a contiguous slice
each, at 128K-256K keys with the queries at the end (chunked prefill, end-aligned causal).

    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc_per_node=2 \\
        bench/bench_context_parallel.py [--out DIR]
    # CPU smoke run (gloo, tiny shapes):
    torchrun --standalone --nproc_per_node=2 bench/bench_context_parallel.py --device cpu \\
        --keys 4096 --queries 32 --heads 8 --dim 16 --k-top 64 --candidates 256 --block 256

1 GPU: the single-device `indexer_topk` on all keys, on rank 0's card (the other ranks wait).
W GPUs: `sharded_indexer_topk`, keys split evenly; its time is the slowest rank's.
Columns: ms (median of --reps after a warm-up, CUDA events), speedup (1 GPU / W GPUs), bytes
per query of all-reduce + all-gather payload (CollectiveTraffic's definition), recall of the
single-device selection by the sharded one and the largest difference of their sorted values
(relative; both compute in fp32 from bf16 inputs, so the order of summation differs).
--impls picks the op implementations: "registered" (what the package registers for the device:
the Triton kernels on CUDA) and/or "torch" (the chunked torch implementation, for the rest of the
run). The table names the module that ran. Prints one table last (card named); writes JSON to --out."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import misa_compile  # noqa: F401  (registers the misa ops)
from misa_compile.config import MisaConfig
from misa_compile.distributed import count_collective_bytes, init_from_env, sharded_indexer_topk
from misa_compile.kernels import indexer_topk, ops, torch_impl
from workloads import make_inputs, recall

SCALE = 128 ** -0.5
# fp32 elements one chunk of the torch implementation may use (4 GiB): big enough that the
# matmuls fill the card, small enough for 80 GB.
TORCH_CHUNK_ELEMENTS = 1 << 30


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[131072, 262144])
    parser.add_argument("--queries", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--variants", nargs="+", default=["dense", "misa", "misa_hier"],
                        choices=["dense", "misa", "misa_hier"])
    parser.add_argument("--impls", nargs="+", default=["registered", "torch"],
                        choices=["registered", "torch"])
    parser.add_argument("--heads", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k-top", type=int, default=2048)
    parser.add_argument("--active", type=int, default=8)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--candidates", type=int, default=8192)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--timeout-s", type=float, default=120.0,
                        help="process-group timeout: a stalled rank becomes an error")
    parser.add_argument("--budget-s", type=float, default=1e9,
                        help="start no new case after this many seconds")
    parser.add_argument("--out", default="bench/results/context_parallel")
    return parser.parse_args()


def use_torch_implementation_on_cuda() -> None:
    """Drops the CUDA entries of the ops' implementation table, so that the ops (still
    validating their inputs) run the chunked torch implementation on the GPU too."""
    for op_name in ("dense_topk", "route_heads", "routed_topk", "rerank_topk"):
        ops._IMPLEMENTATIONS.pop((op_name, "cuda"), None)


def implementation_in_use(device: torch.device) -> str:
    """The module implementing misa.routed_topk on `device` (the table falls back to torch)."""
    chosen = ops._IMPLEMENTATIONS.get(("routed_topk", device.type), torch_impl.routed_topk)
    return f"{chosen.__module__} on {device.type}"


def config_for(args, variant: str, impl: str, local_keys: int) -> MisaConfig:
    chunk = 0
    if impl == "torch":
        # The torch implementation's default chunk (64 MiB of scratch) is a CPU budget; on a GPU
        # that many small steps would time kernel launches, not the indexer.
        per_query = {"dense": args.heads * local_keys,
                     "misa": args.active * local_keys,
                     "misa_hier": max(args.active * local_keys,
                                      args.candidates * (args.heads + args.dim) + local_keys)}
        chunk = max(1, TORCH_CHUNK_ELEMENTS // per_query[variant])
    return MisaConfig(variant=variant, active_heads=args.active, block_size=args.block,
                      candidates=args.candidates, query_chunk=chunk)


def timed_ms(fn, reps: int, device: torch.device, together: bool) -> list[float]:
    """ms of `reps` calls after one warm-up. together: every rank calls fn (a barrier lines the
    ranks up before each call); else only this rank does."""
    fn()
    times = []
    for _ in range(reps):
        if together:
            dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = (torch.cuda.Event(enable_timing=True),
                          torch.cuda.Event(enable_timing=True))
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1e3)
    return times


def slowest_rank(times: list[float], device: torch.device) -> float:
    t = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return statistics.median(t.tolist())


def bench_case(args, impl, keys, queries, variant, device, rank, world) -> dict:
    q, k, w = make_inputs(1, queries, keys, args.heads, args.dim, seed=keys + queries,
                          device=device.type)
    offset, end = keys * rank // world, keys * (rank + 1) // world
    k_local = k[:, offset:end]
    single_config = config_for(args, variant, impl, keys)
    sharded_config = config_for(args, variant, impl, end - offset)

    def single():
        return indexer_topk(q, k, w, args.k_top, single_config, scale=SCALE)

    def sharded():
        return sharded_indexer_topk(q, k_local, w, args.k_top, sharded_config, key_offset=offset,
                                    total_keys=keys, scale=SCALE)

    row = dict(impl=impl, variant=variant, keys=keys, queries=queries, world=world)
    if rank == 0:
        reference = single()
        one_rank = timed_ms(single, args.reps, device, together=False)
        row["one_rank_ms"] = statistics.median(one_rank)
    dist.barrier()
    with count_collective_bytes() as traffic:
        selection = sharded()
    row["sharded_ms"] = slowest_rank(timed_ms(sharded, args.reps, device, together=True), device)
    row["bytes_per_query"] = traffic.total_bytes / queries
    row["bytes_by_step"] = traffic.bytes_by_step
    if rank == 0:
        row["speedup"] = row["one_rank_ms"] / row["sharded_ms"]
        row["recall_vs_one_rank"] = recall(selection[1], selection[0], reference[1], reference[0])
        row["max_rel_value_diff"] = max_relative_difference(selection[0], reference[0])
    del q, k, w, k_local
    return row


def max_relative_difference(values, reference) -> float:
    a, b = values.sort(-1).values, reference.sort(-1).values
    finite = torch.isfinite(a) & torch.isfinite(b)
    if not finite.any():
        return 0.0
    scale = b[finite].abs().max().clamp_min(1e-30)
    return float(((a - b)[finite].abs().max() / scale).item())


def table(card: str, units: tuple[str, str], rows: list[dict], world: int) -> str:
    one, many = units
    lines = [f"Context-parallel indexer on {card}: 1 {one} vs {world} {many}",
             f"| implementation | variant | keys | queries | 1 {one} ms | {world} {many} ms | "
             "speedup | bytes/query | recall | max rel diff |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['implementation']} | {r['variant']} | {r['keys']} | {r['queries']} | "
                     f"{r['one_rank_ms']:.2f} | {r['sharded_ms']:.2f} | {r['speedup']:.2f}x | "
                     f"{r['bytes_per_query']:.0f} | {r['recall_vs_one_rank']:.4f} | "
                     f"{r['max_rel_value_diff']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    device = init_from_env("nccl" if args.device == "cuda" else "gloo", args.timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    started = time.monotonic()
    out = Path(args.out)
    rows: list[dict] = []
    meta = dict(card=card, world=world, torch=torch.__version__, k_top=args.k_top,
                active_heads=args.active, block_size=args.block, candidates=args.candidates,
                heads=args.heads, dim=args.dim, reps=args.reps, scale=SCALE,
                nccl_nvls_enable=os.environ.get("NCCL_NVLS_ENABLE"))
    for impl in args.impls:
        if impl == "torch" and device.type == "cuda":
            use_torch_implementation_on_cuda()
        implementation = implementation_in_use(device)
        for keys in args.keys:
            for queries in args.queries:
                for variant in args.variants:
                    if time.monotonic() - started > args.budget_s:
                        continue
                    row = bench_case(args, impl, keys, queries, variant, device, rank, world)
                    row["implementation"] = implementation
                    rows.append(row)
                    if rank == 0:
                        print(json.dumps(row), flush=True)
                        out.mkdir(parents=True, exist_ok=True)
                        (out / "context_parallel.json").write_text(
                            json.dumps(dict(meta=meta, rows=rows), indent=1))
    if rank == 0:
        units = ("GPU", "GPUs") if device.type == "cuda" else ("process", "processes")
        report = table(card, units, rows, world)
        (out / "context_parallel.md").write_text(report + "\n")
        print(report, flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
