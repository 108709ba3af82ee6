"""`make demo`: the dense DSA indexer next to MISA (h=8) and MISA-hierarchical on this machine's
CPU (or GPU, if present), on a generated workload with the structure of real indexers. Prints one
table: time, speedup over dense, recall of the dense selection, peak extra memory."""
from __future__ import annotations

import argparse
import platform

import torch

from .config import MisaConfig
from .eval.workloads import structured_workload
from .kernels import indexer_topk
from .kernels.reference import selection_recall
from .measure import format_bytes, measure

HEADS, DIM, K_TOP, QUERIES = 64, 128, 2048, 256
VARIANTS = (
    ("dense (64 heads)", MisaConfig(variant="dense")),
    ("MISA h=8", MisaConfig(variant="misa", active_heads=8)),
    ("MISA-hier h=8", MisaConfig(variant="misa_hier", active_heads=8, candidates=4096)),
)


def run_table(lengths: list[int], device: torch.device) -> list[dict]:
    rows = []
    for keys in lengths:
        workload = structured_workload(batch=1, queries=QUERIES, keys=keys, heads=HEADS, dim=DIM,
                                       seed=keys, device=device)
        q, k, w = workload.q, workload.k, workload.w
        dense = None
        for name, config in VARIANTS:
            # This first call is also the warm-up of the timing below.
            values, indices = indexer_topk(q, k, w, K_TOP, config)
            if dense is None:
                dense = (values, indices)
            recall = selection_recall(indices, values, dense[1], dense[0]).mean().item()
            timing = measure(lambda: indexer_topk(q, k, w, K_TOP, config), device, repeats=3,
                             warmup=False)
            rows.append(dict(keys=keys, variant=name, ms=timing.ms, recall=recall,
                             peak=timing.peak_bytes))
    for row in rows:
        dense_ms = next(r["ms"] for r in rows if r["keys"] == row["keys"])
        row["speedup"] = dense_ms / row["ms"]
    return rows


def format_table(rows: list[dict], device_name: str) -> str:
    header = (f"{QUERIES} queries at the end of T keys, H={HEADS}, D={DIM}, k_top={K_TOP}, "
              f"router block 1024, structured synthetic workload, on {device_name}")
    lines = [header, "",
             "| T keys | variant | ms | speedup vs dense | recall of dense | peak extra memory |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['keys']} | {r['variant']} | {r['ms']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['recall']:.3f} | {format_bytes(r['peak'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU ({platform.processor() or platform.machine()}, "
                        f"{torch.get_num_threads()} threads)")
    print(format_table(run_table(args.lengths, device), device_name))
    from .eval import demo_summary
    print()
    demo_summary(device=device)


if __name__ == "__main__":
    main()
