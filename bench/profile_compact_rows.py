"""Where compact_rows' time goes at 8192 x 65536 fp32 scores (top-k alone, k = 2048, threshold
from the real 1-in-16 sample): the tuned kernel, the same rows split over several programs
(atomic slot reservation), and one loop with its stages left out in turn, with masked or
unmasked loads, at several piece widths and warps. One table, last:

    PYTHONPATH=bench python3 bench/profile_compact_rows.py
    TRITON_INTERPRET=1 PYTHONPATH=bench python3 bench/profile_compact_rows.py   # CPU check

Stages (STAGES): 0 = load, compare, count; 1 = + the slots' prefix sum; 2 = + the stores, with
4-wide vector loads (what compact_rows did); 3 = stores placed by a two-level scan (runs of 16
lanes, then the runs' counts) instead of one scan over the piece; 4 = stage 2 storing the values
only (half the stores); 5 = stage 2 storing value and key id packed in one 8-byte store; 6 =
stage 2 with scalar loads, which give each lane every 32nd element, so that a store instruction
covers 32 consecutive elements (kept ones land in consecutive slots); "2 + prefetch" = stage 2
with the next piece loaded before the current one is scanned. The lists of stages 2, 3, 5 and 6
are checked against compact_rows' (as sets), the counts of stage 4. On an H100 (docs/kernels.md)
stages 0-1 ran at the read rate (0.71 ms), stage 2 took 1.55 ms and stage 6 0.90: with vector
loads the stores first moved every piece through shared memory into their own layout, so
compact_rows now loads as stage 6 does, and its tuned time is stage 6's."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

import misa_compile  # noqa: F401
from misa_compile.kernels.triton.selection import sample_threshold as st
from misa_compile.kernels.triton.selection import compact_rows as cr
from misa_compile.kernels.triton.selection.compact_rows import compact_rows
from misa_compile.kernels.triton.selection.row_topk import plan_selection

CPU_CHECK = os.environ.get("TRITON_INTERPRET") == "1"
TILES = ((16, 1),) if CPU_CHECK else ((512, 1), (1024, 1), (1024, 2), (2048, 4), (4096, 8))


@triton.jit
def load_piece(row, cols, n_cols, UNMASKED: tl.constexpr):
    if UNMASKED:
        # (with PREFETCH the last piece reads one piece past the row: the next row, or the
        # tensor's spare tail that main allocates)
        return tl.load(row + cols)
    return tl.load(row + cols, mask=cols < n_cols, other=float("-inf"))


@triton.jit
def compact_stages_kernel(src_ptr, lo_ptr, val_ptr, idx_ptr, pack_ptr, count_ptr, n_cols,
                          stride_r, CAP: tl.constexpr, STAGES: tl.constexpr,
                          UNMASKED: tl.constexpr, BLOCK: tl.constexpr,
                          PREFETCH: tl.constexpr = False):
    r = tl.program_id(0)
    row = src_ptr + r.to(tl.int64) * stride_r
    out_val = val_ptr + r.to(tl.int64) * CAP
    out_idx = idx_ptr + r.to(tl.int64) * CAP
    out_pack = pack_ptr + r.to(tl.int64) * CAP
    lo = tl.load(lo_ptr + r)
    count = tl.zeros((), dtype=tl.int32)
    sink = tl.zeros((), dtype=tl.int32)  # keeps stage 1's scan alive without stores
    x_next = load_piece(row, tl.arange(0, BLOCK), n_cols, UNMASKED)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        if STAGES == 6:
            # Contiguity 1 turns the vector loads into scalar ones, and with them the layout:
            # lane t holds elements t, t + 32, ..., so that a store instruction covers 32
            # consecutive elements, whose kept ones have consecutive slots.
            cols = tl.max_contiguous(cols, 1)
        if PREFETCH:
            # The next piece's load is issued before this piece's scan and stores, so the two
            # overlap (Triton does not pipeline loads that feed no dot).
            x = x_next
            x_next = load_piece(row, cols + BLOCK, n_cols, UNMASKED)
        else:
            x = load_piece(row, cols, n_cols, UNMASKED)
        take = ((x >= lo) & (x > float("-inf"))).to(tl.int32)
        if STAGES == 3:
            runs = tl.reshape(take, [BLOCK // 16, 16])
            run_n = tl.sum(runs, axis=1)
            slot = (count + (tl.cumsum(run_n, axis=0) - run_n)[:, None]
                    + tl.cumsum(runs, axis=1) - 1)
            keep = (runs > 0) & (slot < CAP)
            tl.store(out_val + slot, tl.reshape(x, [BLOCK // 16, 16]), mask=keep)
            tl.store(out_idx + slot, tl.reshape(cols, [BLOCK // 16, 16]), mask=keep)
        elif STAGES >= 1:
            slot = count + tl.cumsum(take, axis=0) - 1
            keep = (take > 0) & (slot < CAP)
            if STAGES == 1:
                sink += tl.max(tl.where(take > 0, slot, 0), axis=0)
            elif STAGES == 2 or STAGES == 6:
                tl.store(out_val + slot, x, mask=keep)
                tl.store(out_idx + slot, cols, mask=keep)
            elif STAGES == 4:
                tl.store(out_val + slot, x, mask=keep)
            else:
                # Value bits high, key id low: one 8-byte store per candidate.
                bits = x.to(tl.int32, bitcast=True).to(tl.int64) << 32
                tl.store(out_pack + slot, bits | cols.to(tl.int64), mask=keep)
        count += tl.sum(take, axis=0)
    tl.store(count_ptr + r, count + sink)


def main():
    device = "cpu" if CPU_CHECK else "cuda"
    rows, width, k_top = (4, 4096, 64) if CPU_CHECK else (8192, 65536, 2048)
    plan = plan_selection(k_top, width)
    # One spare piece past the last row, which unmasked prefetching loads read.
    x = torch.randn(rows * width + 4096, device=device)[:rows * width].view(1, rows, width)
    lo = torch.empty(rows, device=device)
    st.sample_threshold(x, plan.rank, plan.n_sample, lo, column_stride=plan.key_stride)
    val = torch.empty(rows, plan.capacity, device=device)
    idx = torch.empty(rows, plan.capacity, dtype=torch.int32, device=device)
    count = torch.empty(rows, dtype=torch.int32, device=device)
    pack = torch.empty(rows, plan.capacity, dtype=torch.int64, device=device)

    def ms(fn):
        if CPU_CHECK:
            fn()
            return float("nan")
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")

    table = {"read (x.sum)": ms(lambda: x.sum()),
             "compact_rows (tuned)": ms(lambda: compact_rows(x, lo, val, idx, count))}
    for parts in (2, 4, 8):
        table[f"compact_rows, {parts} programs a row"] = ms(
            lambda parts=parts: compact_rows(x, lo, val, idx, count, parts=parts))
    compact_rows(x, lo, val, idx, count)
    want_count = count.clone()
    checked = sorted({0, rows // 2, rows - 1})
    want = {i: set(idx[i, :int(want_count[i])].tolist()) for i in checked}
    variants = [(stages, False) for stages in (0, 1, 2, 3, 4, 5, 6)] + [(2, True)]
    for stages, prefetch in variants:
        for unmasked in (False, True):
            for block, warps in TILES:
                def run(stages=stages, unmasked=unmasked, block=block, warps=warps,
                        prefetch=prefetch):
                    compact_stages_kernel[(rows,)](
                        x, lo, val, idx, pack, count, width, x.stride(1), CAP=plan.capacity,
                        STAGES=stages, UNMASKED=unmasked, BLOCK=block, PREFETCH=prefetch,
                        num_warps=warps)
                name = (f"stages {stages}{' + prefetch' if prefetch else ''}, "
                        f"{'unmasked' if unmasked else 'masked'} loads, {block} x {warps} warps")
                table[name] = ms(run)
                if stages >= 2:
                    run()
                    ids = {2: idx, 3: idx, 4: None, 5: pack & 0xFFFFFFFF, 6: idx}[stages]
                    same = torch.equal(count, want_count) and (ids is None or all(
                        set(ids[i, :int(count[i])].tolist()) == want[i] for i in checked))
                    assert same, f"{name}: lists differ from compact_rows'"
    if not CPU_CHECK:
        print("compact_rows tuned configs (key: CAP, SPLIT, dtypes):", cr._tuned_kernel.cache)
    for name, value in table.items():
        print(f"{name:52s} {value:8.3f} ms")


if __name__ == "__main__":
    main()
