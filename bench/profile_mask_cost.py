"""Where a bool mask costs time on the routed (MISA) path: route_heads + routed_topk at a causal
prefill with causal=True alone, then with causal=True plus the [S,T] lower-triangular bool mask a
model hands in (the packed-sequence mask transformers builds without a cache), per CUDA kernel.

    python bench/profile_mask_cost.py [--length 32768]"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch
import triton

import misa_compile  # noqa: F401
from workloads import make_inputs

ops = torch.ops.misa


def kernel_times(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    per_kernel = defaultdict(float)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.key[:60]] += event.device_time_total / 1000 / reps
    return per_kernel


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=32768)
    length = parser.parse_args().length
    q, k, w = make_inputs(1, length, length)
    mask = torch.ones(length, length, dtype=torch.bool, device="cuda").tril()[None]

    def run(with_mask):
        m = mask if with_mask else None
        heads = ops.route_heads(q, k, w, 8, causal=True, mask=m)
        return ops.routed_topk(q, k, w, heads, 2048, causal=True, mask=m)

    rows = []
    for name, with_mask in (("causal", False), ("causal+mask", True)):
        total = triton.testing.do_bench(lambda: run(with_mask), warmup=3, rep=20,
                                        return_mode="median")
        rows.append((name, total, kernel_times(lambda: run(with_mask))))
    names = sorted(set().union(*(r[2] for r in rows)), key=lambda n: -rows[1][2].get(n, 0))
    print(f"| kernel (L={length}) | " + " | ".join(r[0] + " ms" for r in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for n in names:
        print(f"| {n} | " + " | ".join(f"{r[2].get(n, 0):.3f}" for r in rows) + " |")
    print("| **total (do_bench)** | " + " | ".join(f"{r[1]:.3f}" for r in rows) + " |")


if __name__ == "__main__":
    main()
