"""Context-parallel indexer: one GPU holding all keys against W GPUs holding a contiguous slice
each, the queries at the end of the keys (chunked prefill, end-aligned causal).

    # one GPU, one rank (a process group of one; no torchrun needed):
    python3 bench/bench_context_parallel.py [--quick] [--out DIR]
    # W GPUs (NCCL):
    torchrun --standalone --nproc_per_node=2 bench/bench_context_parallel.py [--quick] [--out DIR]
    # CPU (gloo), tiny shapes; torchrun --nproc_per_node=2 works the same way:
    python3 bench/bench_context_parallel.py --device cpu --keys 512 --queries 8 --heads 4 \\
        --dim 16 --k-top 16 --candidates 64 --block 64 --compile-target aot_eager

Modes (--modes):
  sharded   `sharded_indexer_topk` with the keys split evenly, every (keys, queries, variant).
  compiled  a plain indexer module (einsum, ReLU, weights, sum over heads, top-k, as models write
            it) compiled with backend="misa" and context_parallel=True on each rank's shard: the
            rewritten site (misa::sharded_topk) against the single-device `indexer_topk` over all
            keys (no causality: the module sees every key). First --keys and --queries only.
The baseline is the single-device `indexer_topk` on all keys, run by rank 0 alone (where it fits
in memory). With one rank the comparison measures the cost of the sharded machinery itself.

Columns: ms (median of --reps after a warm-up; CUDA events on GPUs); the W-rank time is the
slowest rank's per call, and each rank's own median is listed; speedup (1 GPU / W GPUs); bytes per
query of collective payload (CollectiveTraffic: all-reduce size + all-gathered output); "same":
queries whose selection equals the 1-GPU one up to ties at the k-th value (sorted values equal
within 1e-5 of the row's largest, the same keys strictly above the k-th value), and recall.

On CUDA each case profiles one call of each side and checks that the misa Triton kernels ran
(not the ops' torch implementation): the "kernels" column says so ("unverified" where the profiler
saw no CUDA kernel at all), the kernels that ran go to the JSON, and the exit status is 1 if any
case ran without them.
Prints one table last (card named); writes JSON and the table to --out."""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

import misa_compile  # noqa: F401  (registers the misa ops)
import misa_compile.backend
from misa_compile.config import MisaConfig
from misa_compile.distributed import count_collective_bytes, init_from_env, sharded_indexer_topk
from misa_compile.kernels import indexer_topk
from misa_compile.kernels.triton.kernel_names import project_triton_kernel_names
from workloads import make_inputs, recall

SCALE = 128 ** -0.5
DEFAULT_KEYS = [131072, 262144, 524288, 1048576]
DEFAULT_QUERIES = [1024, 4096, 8192]
QUICK_KEYS, QUICK_QUERIES = [131072], [1024]
# Relative tolerance (of a row's largest |value|) for calling two selected values equal: both
# sides compute fp32 scores from the same bf16 inputs, but not necessarily in the same order.
VALUE_RTOL = 1e-5


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"keys {QUICK_KEYS} x queries {QUICK_QUERIES}, 2 reps (unless given)")
    parser.add_argument("--keys", type=int, nargs="+")
    parser.add_argument("--queries", type=int, nargs="+")
    parser.add_argument("--modes", nargs="+", default=["sharded", "compiled"],
                        choices=["sharded", "compiled"])
    parser.add_argument("--variants", nargs="+", default=["dense", "misa", "misa_hier"],
                        choices=["dense", "misa", "misa_hier"])
    parser.add_argument("--heads", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k-top", type=int, default=2048)
    parser.add_argument("--active", type=int, default=8)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--candidates", type=int, default=8192)
    parser.add_argument("--reps", type=int)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--compile-target", default="inductor", choices=["inductor", "aot_eager"])
    parser.add_argument("--timeout-s", type=float, default=600.0,
                        help="process-group timeout: a stalled rank becomes an error (the other "
                             "ranks wait in a barrier while rank 0 runs the 1-GPU baseline)")
    parser.add_argument("--budget-s", type=float, default=1e9,
                        help="start no new case after this many seconds (skipped cases are listed)")
    parser.add_argument("--out", default="bench/results/context_parallel")
    args = parser.parse_args()
    args.keys = args.keys or (QUICK_KEYS if args.quick else DEFAULT_KEYS)
    args.queries = args.queries or (QUICK_QUERIES if args.quick else DEFAULT_QUERIES)
    args.reps = args.reps or (2 if args.quick else 3)
    return args


def single_rank_environment() -> None:
    """Started without torchrun: a process group of one rank on this machine."""
    if "RANK" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def kernels_launched(fn) -> Counter:
    """The CUDA kernels one call of `fn` launches, by name."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return Counter(e.name for e in prof.events() if e.device_type == DeviceType.CUDA)


def check_triton(fn, device: torch.device, collective: bool) -> dict:
    """Profiles one call of `fn` (collective: every rank calls it) and says whether the misa
    Triton kernels ran (on every rank, when collective), with the kernels that ran. triton is
    None when the profiler saw no CUDA kernel at all (it could not trace): nothing is known."""
    if device.type != "cuda":
        return dict(triton=False, note="CPU: the ops' torch implementation ran")
    ours = project_triton_kernel_names()
    launched = kernels_launched(fn)
    triton = {name: n for name, n in launched.items() if name in ours}
    # (misa Triton launches, any kernel seen): the minimum over ranks of each.
    seen = torch.tensor([float(sum(triton.values())), float(bool(launched))], device=device)
    if collective:
        dist.all_reduce(seen, op=dist.ReduceOp.MIN)
    return dict(triton=bool(seen[0] > 0) if seen[1] > 0 else None, triton_kernels=triton,
                other_kernels={name: n for name, n in launched.items() if name not in ours})


def timed_ms(fn, reps: int, device: torch.device, together: bool) -> list[float]:
    """ms of `reps` calls (warm-up done by the caller). together: every rank calls fn (a barrier
    lines the ranks up before each call); else only this rank does."""
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


def gathered(obj, world: int) -> list:
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def compare_selections(values, indices, ref_values, ref_indices) -> dict:
    """Per query: same set of finite keys; same up to ties (sorted values equal within
    VALUE_RTOL of the row's largest |value|, and the same keys strictly above the reference's
    k-th value plus that tolerance). Plus recall and the largest relative value difference."""
    finite, ref_finite = torch.isfinite(values), torch.isfinite(ref_values)
    same_keys = (torch.where(finite, indices, -1).sort(-1).values
                 == torch.where(ref_finite, ref_indices, -1).sort(-1).values).all(-1)
    ordered, ref_ordered = values.sort(-1).values, ref_values.sort(-1).values
    magnitude = ref_values.abs().masked_fill(~ref_finite, 0).amax(-1, keepdim=True)
    tolerance = VALUE_RTOL * magnitude.clamp_min(torch.finfo(torch.float32).tiny)
    close = torch.where(torch.isfinite(ref_ordered),
                        (ordered - ref_ordered).abs() <= tolerance, ordered == ref_ordered)
    kth = ref_values.masked_fill(~ref_finite, float("inf")).amin(-1, keepdim=True)
    above = kth + tolerance
    same_above = (torch.where(values > above, indices, -1).sort(-1).values
                  == torch.where(ref_values > above, ref_indices, -1).sort(-1).values).all(-1)
    same = close.all(-1) & same_above
    both = torch.isfinite(ordered) & torch.isfinite(ref_ordered)
    diff = ((ordered - ref_ordered).abs() / magnitude.clamp_min(1e-30))[both]
    return dict(rows=same.numel(), rows_same_keys=int(same_keys.sum()),
                rows_same_up_to_ties=int(same.sum()), identical=bool(same.all()),
                recall=recall(indices, values, ref_indices, ref_values),
                max_rel_value_diff=float(diff.max()) if diff.numel() else 0.0)


def config_for(args, variant: str) -> MisaConfig:
    return MisaConfig(variant=variant, active_heads=args.active, block_size=args.block,
                      candidates=args.candidates)


def baseline(row: dict, single, args, device, rank) -> tuple:
    """Rank 0 runs the single-device op on all keys (the others wait); returns its selection,
    or None where it does not fit in memory."""
    reference = None
    if rank == 0:
        try:
            reference = single()  # warm-up (first-call compilation) and the reference
            row["one_gpu_check"] = check_triton(single, device, False)
            row["one_gpu_ms"] = statistics.median(timed_ms(single, args.reps, device, False))
        except torch.cuda.OutOfMemoryError as error:
            reference = None
            row["one_gpu_ms"] = None
            row["one_gpu_error"] = f"out of memory: {str(error).splitlines()[0]}"
            torch.cuda.empty_cache()
    dist.barrier()
    return reference


def measure_sharded(row: dict, call, reference, args, device, rank, world) -> None:
    """Times the collective `call` on every rank and fills the row (rank 0's copy complete)."""
    with count_collective_bytes() as traffic:
        values, indices = call()  # warm-up: first-call compilation
    row["bytes_per_query"] = traffic.total_bytes / row["queries"]
    row["bytes_by_step"] = traffic.bytes_by_step
    row["sharded_check"] = check_triton(call, device, True)
    times = gathered(timed_ms(call, args.reps, device, together=True), world)
    row["rank_ms"] = [statistics.median(t) for t in times]
    row["sharded_ms"] = statistics.median(max(per_call) for per_call in zip(*times))
    digest = (float(values.nan_to_num(0.0, 0.0, 0.0).double().sum()),
              float(indices.double().sum()))
    row["same_on_every_rank"] = len(set(gathered(digest, world))) == 1
    if rank == 0 and reference is not None:
        row["speedup"] = row["one_gpu_ms"] / row["sharded_ms"]
        row.update(compare_selections(values, indices, *reference))


def inputs(args, keys: int, queries: int, device: torch.device, world: int):
    """bf16 q, k, w, the same on every rank (rank 0's, broadcast)."""
    q, k, w = make_inputs(1, queries, keys, args.heads, args.dim, seed=keys + queries,
                          device=device.type)
    if world > 1:
        for tensor in (q, k, w):
            dist.broadcast(tensor, src=0)
    return q, k, w


def sharded_case(args, keys, queries, variant, device, rank, world) -> dict:
    q, k, w = inputs(args, keys, queries, device, world)
    offset, end = keys * rank // world, keys * (rank + 1) // world
    k_local = k[:, offset:end]
    config = config_for(args, variant)
    row = dict(mode="sharded", variant=variant, keys=keys, queries=queries, world=world)
    reference = baseline(row, lambda: indexer_topk(q, k, w, args.k_top, config, scale=SCALE),
                         args, device, rank)
    measure_sharded(row, lambda: sharded_indexer_topk(
        q, k_local, w, args.k_top, config, key_offset=offset, total_keys=keys, scale=SCALE),
        reference, args, device, rank, world)
    return row


class PlainIndexer(torch.nn.Module):
    """A DSA lightning indexer as a model writes it, over every key it is given."""

    def __init__(self, k_top: int):
        super().__init__()
        self.k_top = k_top

    def forward(self, q, k, w):
        scores = torch.relu(torch.einsum("bshd,btd->bsht", q.float(), k.float()) * SCALE)
        return (scores * w.float().unsqueeze(-1)).sum(dim=2).topk(self.k_top, dim=-1)


def compiled_case(args, keys, queries, variant, device, rank, world) -> dict:
    q, k, w = inputs(args, keys, queries, device, world)
    k_local = k[:, keys * rank // world:keys * (rank + 1) // world]
    config = config_for(args, variant)
    row = dict(mode="compiled", variant=variant, keys=keys, queries=queries, world=world,
               target=args.compile_target)
    reference = baseline(row, lambda: indexer_topk(q, k, w, args.k_top, config, scale=SCALE,
                                                   causal=False), args, device, rank)
    torch._dynamo.reset()
    misa_compile.backend.clear_reports()
    options = dict(variant=variant, active_heads=args.active, block_size=args.block,
                   candidates=args.candidates, context_parallel=True, target=args.compile_target)
    compiled = torch.compile(PlainIndexer(args.k_top), backend="misa", options=options)
    compiled(q, k_local, w)  # compiles; every rank traces the same graph, so all agree below
    sites = [dict(status=s.status, reason=s.reason, detail=s.detail)
             for s in misa_compile.backend.last_report().sites]
    row["sites"] = sites
    if [s["status"] for s in sites] != ["rewritten"]:
        raise RuntimeError(f"compiled {variant}: the indexer site was not rewritten: {sites}")
    measure_sharded(row, lambda: compiled(q, k_local, w), reference, args, device, rank, world)
    return row


def kernels_used(row: dict) -> str:
    checks = [c for c in (row.get("one_gpu_check"), row["sharded_check"]) if c is not None]
    if "note" in checks[0]:
        return "torch (CPU)"
    if any(c["triton"] is False for c in checks):
        return "NOT Triton"
    return "Triton" if all(c["triton"] for c in checks) else "unverified"


def table(card: str, units: tuple[str, str], rows: list[dict], world: int) -> str:
    one, many = units
    lines = [f"Context-parallel indexer on {card}: 1 {one} (all keys) vs {world} {many} "
             "(keys sharded)",
             f"| mode | variant | keys | queries | 1 {one} ms | {world} {many} ms | per-rank ms | "
             "speedup | bytes/query | same | recall | kernels |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def number(value, form):
        return "-" if value is None else format(value, form)

    for r in rows:
        same = (f"{r['rows_same_up_to_ties']}/{r['rows']}" if "rows" in r else "-")
        lines.append(
            f"| {r['mode']} | {r['variant']} | {r['keys']} | {r['queries']} | "
            f"{number(r.get('one_gpu_ms'), '.2f')} | {r['sharded_ms']:.2f} | "
            f"{' / '.join(f'{t:.2f}' for t in r['rank_ms'])} | "
            f"{number(r.get('speedup'), '.2f')}x | {r['bytes_per_query']:,.0f} | {same} | "
            f"{number(r.get('recall'), '.4f')} | {kernels_used(r)} |")
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    single_rank_environment()
    device = init_from_env("nccl" if args.device == "cuda" else "gloo", args.timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    started = time.monotonic()
    out = Path(args.out)
    # The few compiled cases first, so that --budget-s cuts the largest sharded shapes instead.
    cases = []
    if "compiled" in args.modes:
        cases += [(compiled_case, args.keys[0], args.queries[0], variant)
                  for variant in args.variants]
    if "sharded" in args.modes:
        cases += [(sharded_case, keys, queries, variant) for keys in args.keys
                  for queries in args.queries for variant in args.variants]
    meta = dict(card=card, world=world, backend=str(dist.get_backend()), torch=torch.__version__,
                k_top=args.k_top, active_heads=args.active, block_size=args.block,
                candidates=args.candidates, heads=args.heads, dim=args.dim, reps=args.reps,
                scale=SCALE, nccl_nvls_enable=os.environ.get("NCCL_NVLS_ENABLE"))
    rows: list[dict] = []
    skipped: list[dict] = []
    for run, keys, queries, variant in cases:
        case = dict(mode=run.__name__.removesuffix("_case"), variant=variant, keys=keys,
                    queries=queries)
        if time.monotonic() - started > args.budget_s:
            skipped.append(case)
            continue
        rows.append(run(args, keys, queries, variant, device, rank, world))
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if rank == 0:
            print(json.dumps(rows[-1]), flush=True)
            out.mkdir(parents=True, exist_ok=True)
            (out / "context_parallel.json").write_text(
                json.dumps(dict(meta=meta, rows=rows, skipped_for_budget=skipped), indent=1))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "context_parallel.json").write_text(
            json.dumps(dict(meta=meta, rows=rows, skipped_for_budget=skipped), indent=1))
        units = ("GPU", "GPUs") if device.type == "cuda" else ("process", "processes")
        units = (units[0], units[0] if world == 1 else units[1])
        report = table(card, units, rows, world)
        if device.type == "cuda" and any(kernels_used(r) != "Triton" for r in rows):
            report += ("\nSome cases did not run the misa Triton kernels, or the profiler could "
                       "not tell (see the JSON).")
        if skipped:
            report += f"\nNot run (--budget-s {args.budget_s:g}): {skipped}"
        (out / "context_parallel.md").write_text(report + "\n")
        print(report, flush=True)
    # Every rank leaves together. Once, on a 2-core CPU machine, gloo rank 1 aborted
    # ("terminate called without an active exception") after tearing its group down while
    # rank 0 still wrote the report.
    dist.barrier()
    dist.destroy_process_group()
    return int(device.type == "cuda" and any(kernels_used(r) == "NOT Triton" for r in rows))


if __name__ == "__main__":
    sys.exit(main())
