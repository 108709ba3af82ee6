"""The k-th largest order-preserving 32-bit key (common.ordered_key) of a row held in registers.

kth_largest, the one the selections call, bins the lanes' fp32 values twice over the row's finite
range (256 linear bins, then 256 sub-bins of the chosen bin): any monotone binning keeps the
answer in the bin that the counts point to, and two passes over the value range leave only a
lane or two in the final bin, where a few exact reductions over the keys finish. A row whose
final bin still holds many distinct keys (values spread over many orders of magnitude, a span
past fp32) falls back to kth_largest_key, an exact radix select over the key bits: four passes
of 8-bit digits, most significant first, each one 256-bin tl.histogram and a suffix sum over the
bins, where a bitwise search needs 32 rounds, each a full reduction (latency bound).

Pass p fixes digit p of the answer. A lane whose higher digits differ from the prefix fixed so far
is not masked out of the histogram (its mask argument is missing from some Triton versions, and
the mask would cost a ballot per element): a lane above the prefix counts as digit 255, one below
as digit 0. Then for every d >= 1 the bins >= d count exactly the keys >= prefix | d << shift,
and the answer's digit is the largest d whose count reaches k (0 when none does). The answer is
the largest t with count(keys >= t) >= k, i.e. the k-th largest key, and 0 when fewer than k keys
are > 0 (padding lanes carry key 0)."""
from __future__ import annotations

import triton
import triton.language as tl

from ..common import ordered_key

BINS = tl.constexpr(256)
# Distinct keys the exact finish of kth_largest walks down through before falling back.
FINISH_STEPS = tl.constexpr(16)


@triton.jit
def radix_digit(keys, prefix, SHIFT: tl.constexpr):
    """int32 histogram input of pass SHIFT (24, 16, 8, 0): the keys' digit at SHIFT where their
    higher bits equal prefix's, else 255 above the prefix and 0 below it."""
    digit = ((keys >> SHIFT) & 0xFF).to(tl.int32)
    if SHIFT < 24:
        high = keys >> (SHIFT + 8)
        fixed = prefix >> (SHIFT + 8)
        digit = tl.where(high > fixed, 255, tl.where(high < fixed, 0, digit))
    return digit


@triton.jit
def pick_digit(hist, total, prefix, above, k, SHIFT: tl.constexpr):
    """(prefix with the answer's digit at SHIFT set, count of keys above the range of keys that
    share that new prefix) from the pass's histogram over `total` lanes; `above` is that count
    for the previous prefix (0 before the first pass). After the last pass (SHIFT 0) the count
    is that of the keys > the answer."""
    bins = tl.arange(0, BINS)
    # at_least[d] = lanes with digit >= d (the histogram's suffix sum).
    at_least = total - tl.cumsum(hist, axis=0) + hist
    digit = tl.max(tl.where(at_least >= k, bins, 0), axis=0)
    # Lanes with a digit above the answer's are the keys above the new prefix, except at digit
    # 255: bin 255 also holds the lanes above the previous prefix, which are exactly those.
    beyond = tl.sum(tl.where(bins == digit, at_least - hist, 0), axis=0)
    above = tl.where(digit == BINS - 1, above, beyond)
    return prefix | (digit.to(tl.uint32) << SHIFT), above


@triton.jit
def kth_largest_key(keys, k, LANES: tl.constexpr):
    """(k-th largest of the uint32 keys held in registers (LANES of them, padding lanes 0), count
    of keys greater than it)."""
    prefix = tl.zeros((), dtype=tl.uint32)
    above = tl.zeros((), dtype=tl.int32)
    for p in tl.static_range(4):
        hist = tl.histogram(radix_digit(keys, prefix, 24 - 8 * p), BINS)
        prefix, above = pick_digit(hist, LANES, prefix, above, k, 24 - 8 * p)
    return prefix, above


@triton.jit
def value_bins(x, values):
    """Bin 0..255 of each lane from x >= 0, its position in bin units (any monotone function of
    the value works, however fp32 rounds it); +inf lanes take the top bin."""
    bins = tl.minimum(tl.maximum(x.to(tl.int32), 0), BINS - 1)  # truncation is the floor
    return tl.where(values == float("inf"), BINS - 1, bins)


@triton.jit
def kth_largest(values, keys, k, LANES: tl.constexpr):
    """kth_largest_key's result for keys = ordered_key(values) (NaN lanes -inf; padding lanes
    value -inf and key 0), by two passes over the value range and an exact finish."""
    finite = tl.abs(values) < float("inf")
    vmax = tl.max(tl.where(finite, values, float("-inf")), axis=0)
    vmin = tl.min(tl.where(finite, values, float("inf")), axis=0)
    span = vmax - vmin
    # No finite value, a single one, or a span past fp32: every finite lane lands in bin 0 and
    # the finish (or the fallback) decides.
    spread = (span > 0) & (span < float("inf"))
    scale = tl.where(spread, BINS / tl.where(spread, span, 1.0), 0.0)
    pos = (tl.where(finite, values, vmin) - vmin) * scale  # -inf lanes: bin 0
    coarse = value_bins(pos, values)
    zero = tl.zeros((), dtype=tl.uint32)
    digit, above = pick_digit(tl.histogram(coarse, BINS), LANES, zero,
                              tl.zeros((), dtype=tl.int32), k, 0)
    d1 = digit.to(tl.int32)
    # Sub-bins of bin d1; lanes above it count as 255 and below as 0, as in radix_digit.
    sub = value_bins((pos - d1.to(tl.float32)) * BINS, values)
    fine = tl.where(coarse > d1, BINS - 1, tl.where(coarse < d1, 0, sub))
    digit, above = pick_digit(tl.histogram(fine, BINS), LANES, zero, above, k, 0)
    in_final = (coarse == d1) & (fine == digit.to(tl.int32))
    # The final bin holds the answer and at least `need` lanes; lanes outside it have keys
    # above or below all of its keys (equal keys share a value, hence a bin).
    need = k - above
    cur = tl.max(tl.where(in_final, keys, 0), axis=0)
    at_or_above = tl.sum((in_final & (keys >= cur)).to(tl.int32), axis=0)
    steps = tl.zeros((), dtype=tl.int32)
    while (at_or_above < need) & (steps < FINISH_STEPS):
        cur = tl.max(tl.where(in_final & (keys < cur), keys, 0), axis=0)
        at_or_above = tl.sum((in_final & (keys >= cur)).to(tl.int32), axis=0)
        steps += 1
    above = above + tl.sum((in_final & (keys > cur)).to(tl.int32), axis=0)
    if at_or_above < need:
        cur, above = kth_largest_key(keys, k, LANES)
    return cur, above


@triton.jit
def row_chunk(row, slots, n):
    """(values, keys) of lanes `slots` of a row in memory: lanes >= n are padding (value -inf,
    key 0), NaN is -inf."""
    x = tl.load(row + slots, mask=slots < n, other=float("-inf"))
    x = tl.where(x == x, x, float("-inf"))
    return x, tl.where(slots < n, ordered_key(x), 0)


@triton.jit
def streamed_kth_largest_key(row, n, k, lanes, CHUNK: tl.constexpr):
    """kth_largest_key over `lanes` lanes of a row streamed from memory in CHUNK pieces (lanes
    >= n padding): each of the four passes sums the pieces' histograms."""
    offsets = tl.arange(0, CHUNK)
    prefix = tl.zeros((), dtype=tl.uint32)
    above = tl.zeros((), dtype=tl.int32)
    for p in tl.static_range(4):
        hist = tl.zeros((BINS,), dtype=tl.int32)
        for c0 in range(0, lanes, CHUNK):
            _, keys = row_chunk(row, c0 + offsets, n)
            hist += tl.histogram(radix_digit(keys, prefix, 24 - 8 * p), BINS)
        prefix, above = pick_digit(hist, lanes, prefix, above, k, 24 - 8 * p)
    return prefix, above


@triton.jit
def final_bins(values, vmin, scale, d1):
    """(coarse bin, fine bin) of each lane as kth_largest bins them (fine: 255 above bin d1, 0
    below it)."""
    finite = tl.abs(values) < float("inf")
    pos = (tl.where(finite, values, vmin) - vmin) * scale
    coarse = value_bins(pos, values)
    sub = value_bins((pos - d1.to(tl.float32)) * BINS, values)
    return coarse, tl.where(coarse > d1, BINS - 1, tl.where(coarse < d1, 0, sub))


@triton.jit
def streamed_bin_max(row, n, lanes, vmin, scale, d1, d2, ceiling, CHUNK: tl.constexpr):
    """(largest key below `ceiling` in the final bin (d1, d2), how many lanes hold it), streamed;
    (0, lanes of the bin with key 0) when none is above 0."""
    offsets = tl.arange(0, CHUNK)
    best = tl.zeros((), dtype=tl.uint32)
    count = tl.zeros((), dtype=tl.int32)
    for c0 in range(0, lanes, CHUNK):
        values, keys = row_chunk(row, c0 + offsets, n)
        coarse, fine = final_bins(values, vmin, scale, d1)
        take = (coarse == d1) & (fine == d2) & (keys < ceiling)
        chunk_best = tl.max(tl.where(take, keys, 0), axis=0)
        chunk_count = tl.sum((take & (keys == chunk_best)).to(tl.int32), axis=0)
        count = tl.where(chunk_best > best, chunk_count,
                         tl.where(chunk_best == best, count + chunk_count, count))
        best = tl.maximum(best, chunk_best)
    return best, count


@triton.jit
def streamed_kth_largest(row, n, k, lanes, CHUNK: tl.constexpr):
    """kth_largest over `lanes` lanes of a row streamed from memory in CHUNK pieces (lanes >= n
    padding): a pass for the value range, one per histogram, one per key the finish walks
    through (usually one), kth_largest_key's four when the finish gives up."""
    offsets = tl.arange(0, CHUNK)
    vmax = tl.full((), float("-inf"), tl.float32)
    vmin = tl.full((), float("inf"), tl.float32)
    for c0 in range(0, lanes, CHUNK):
        values, _ = row_chunk(row, c0 + offsets, n)
        finite = tl.abs(values) < float("inf")
        vmax = tl.maximum(vmax, tl.max(tl.where(finite, values, float("-inf")), axis=0))
        vmin = tl.minimum(vmin, tl.min(tl.where(finite, values, float("inf")), axis=0))
    span = vmax - vmin
    spread = (span > 0) & (span < float("inf"))
    scale = tl.where(spread, BINS / tl.where(spread, span, 1.0), 0.0)
    zero = tl.zeros((), dtype=tl.uint32)
    hist = tl.zeros((BINS,), dtype=tl.int32)
    for c0 in range(0, lanes, CHUNK):
        values, _ = row_chunk(row, c0 + offsets, n)
        finite = tl.abs(values) < float("inf")
        hist += tl.histogram(value_bins((tl.where(finite, values, vmin) - vmin) * scale, values),
                             BINS)
    digit, above = pick_digit(hist, lanes, zero, tl.zeros((), dtype=tl.int32), k, 0)
    d1 = digit.to(tl.int32)
    hist = tl.zeros((BINS,), dtype=tl.int32)
    for c0 in range(0, lanes, CHUNK):
        values, _ = row_chunk(row, c0 + offsets, n)
        _, fine = final_bins(values, vmin, scale, d1)
        hist += tl.histogram(fine, BINS)
    digit, above = pick_digit(hist, lanes, zero, above, k, 0)
    d2 = digit.to(tl.int32)
    need = k - above
    # Walk the final bin's distinct keys down from the top, as kth_largest does in registers.
    cur, at_cur = streamed_bin_max(row, n, lanes, vmin, scale, d1, d2,
                                   tl.full((), 0xFFFFFFFF, tl.uint32), CHUNK)
    at_or_above = at_cur
    steps = tl.zeros((), dtype=tl.int32)
    while (at_or_above < need) & (steps < FINISH_STEPS):
        cur, at_cur = streamed_bin_max(row, n, lanes, vmin, scale, d1, d2, cur, CHUNK)
        at_or_above += at_cur
        steps += 1
    above = above + at_or_above - at_cur
    if at_or_above < need:
        cur, above = streamed_kth_largest_key(row, n, k, lanes, CHUNK)
    return cur, above
