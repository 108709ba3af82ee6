"""The k-th largest order-preserving 32-bit key (common.ordered_key) of a row held in registers.

kth_largest, the one the selections call, maps each lane's fp32 value to a 15-bit code, its
position in 32768 equal bins over the row's finite range (any monotone map of the value keeps the
answer in the code that the counts point to), and radix-selects the code in three passes of
5-bit digits (32 bins). That leaves a lane or two in the final code, where a few exact reductions
over the keys finish. A row whose final code still holds many distinct keys (values spread over
many orders of magnitude, a span past fp32) falls back to kth_largest_key, an exact radix select
over the key bits: four passes of 8-bit digits, most significant first.

Why 32 bins a pass: tl.histogram counts a warp's lanes with one ballot per bit of the bin index
and, per bin a lane owns (bins / 32 of them), an AND of those ballots and a popcount. 256 bins
cost about 90 instructions per element held, 32 bins about 12, so three 32-bin passes cost a
quarter of two 256-bin ones (the same resolution, 2^15 against 2^16 bins, where the final code
rarely holds more than the answer). Each pass is one histogram and a suffix sum over its bins,
where a bitwise search needs a full reduction per bit (latency bound).

Pass p fixes digit p of the answer. A lane whose higher digits differ from the prefix fixed so far
is not masked out of the histogram (its mask argument is missing from some Triton versions, and
the mask would cost a ballot per element): a lane above the prefix counts as the top digit, one
below as digit 0. Then for every d >= 1 the bins >= d count exactly the codes >= prefix | d <<
shift, and the answer's digit is the largest d whose count reaches k (0 when none does). The
answer is the largest t with count(codes >= t) >= k, i.e. the k-th largest code, and 0 when fewer
than k codes are > 0 (padding lanes carry code 0)."""
from __future__ import annotations

import triton
import triton.language as tl

from ..common import ordered_key

# Digits of the exact select over the 32-bit keys (the rare fallback; 256 bins a pass).
KEY_BITS, KEY_DIGIT, KEY_BINS = tl.constexpr(32), tl.constexpr(8), tl.constexpr(256)
# The value codes and their digits: three passes of 32 bins.
VALUE_BITS, VALUE_DIGIT, VALUE_BINS = tl.constexpr(15), tl.constexpr(5), tl.constexpr(32)
VALUE_CODES = tl.constexpr(1 << 15)
# Distinct keys the exact finish of kth_largest walks down through before falling back.
FINISH_STEPS = tl.constexpr(16)


@triton.jit
def radix_digit(codes, prefix, SHIFT: tl.constexpr, DIGIT: tl.constexpr, BITS: tl.constexpr,
                BINS: tl.constexpr):
    """int32 histogram input of the pass at SHIFT over BITS-bit codes: the codes' DIGIT-bit digit
    (BINS = 2^DIGIT values) at SHIFT where their higher bits equal prefix's, else the top digit
    above the prefix and 0 below it."""
    digit = ((codes >> SHIFT) & (BINS - 1)).to(tl.int32)
    if SHIFT + DIGIT < BITS:
        high = codes >> (SHIFT + DIGIT)
        fixed = prefix >> (SHIFT + DIGIT)
        digit = tl.where(high > fixed, BINS - 1, tl.where(high < fixed, 0, digit))
    return digit


@triton.jit
def pick_digit(hist, total, prefix, above, k, SHIFT: tl.constexpr, BINS: tl.constexpr):
    """(prefix with the answer's digit at SHIFT set, count of codes above the range of codes that
    share that new prefix) from the pass's BINS-bin histogram over `total` lanes; `above` is that
    count for the previous prefix (0 before the first pass). After the last pass (SHIFT 0) the
    count is that of the codes > the answer."""
    bins = tl.arange(0, BINS)
    # at_least[d] = lanes with digit >= d (the histogram's suffix sum).
    at_least = total - tl.cumsum(hist, axis=0) + hist
    digit = tl.max(tl.where(at_least >= k, bins, 0), axis=0)
    # Lanes with a digit above the answer's are the codes above the new prefix, except at the
    # top digit: its bin also holds the lanes above the previous prefix, which are exactly those.
    beyond = tl.sum(tl.where(bins == digit, at_least - hist, 0), axis=0)
    above = tl.where(digit == BINS - 1, above, beyond)
    return prefix | (digit.to(tl.uint32) << SHIFT), above


@triton.jit
def radix_select(codes, k, LANES: tl.constexpr, BITS: tl.constexpr, DIGIT: tl.constexpr,
                 BINS: tl.constexpr):
    """(k-th largest of the uint32 BITS-bit codes held in registers (LANES of them, padding lanes
    0), count of codes greater than it), in BITS / DIGIT passes of BINS = 2^DIGIT bins."""
    prefix = tl.zeros((), dtype=tl.uint32)
    above = tl.zeros((), dtype=tl.int32)
    for p in tl.static_range(BITS // DIGIT):
        # Digit p sits at bit BITS - DIGIT * (p + 1).
        hist = tl.histogram(radix_digit(codes, prefix, BITS - DIGIT * (p + 1), DIGIT, BITS,
                                        BINS), BINS)
        prefix, above = pick_digit(hist, LANES, prefix, above, k, BITS - DIGIT * (p + 1), BINS)
    return prefix, above


@triton.jit
def kth_largest_key(keys, k, LANES: tl.constexpr):
    """(k-th largest of the uint32 keys held in registers (LANES of them, padding lanes 0), count
    of keys greater than it)."""
    return radix_select(keys, k, LANES, KEY_BITS, KEY_DIGIT, KEY_BINS)


@triton.jit
def value_range(values):
    """(vmin, scale) of the value codes: scale maps the finite span onto the 2^VALUE_BITS codes.
    No finite value, a single one, or a span past fp32: scale 0, every finite lane takes code 0
    and the finish (or the fallback) decides."""
    finite = tl.abs(values) < float("inf")
    vmax = tl.max(tl.where(finite, values, float("-inf")), axis=0)
    vmin = tl.min(tl.where(finite, values, float("inf")), axis=0)
    return vmin, code_scale(vmin, vmax)


@triton.jit
def code_scale(vmin, vmax):
    span = vmax - vmin
    spread = (span > 0) & (span < float("inf"))
    return tl.where(spread, VALUE_CODES / tl.where(spread, span, 1.0), 0.0)


@triton.jit
def value_codes(values, vmin, scale):
    """uint32 code of each lane, 0 .. 2^VALUE_BITS - 1, non-decreasing in the value (however fp32
    rounds the position; truncation is the floor): -inf lanes code 0, +inf lanes the top code."""
    finite = tl.abs(values) < float("inf")
    pos = (tl.where(finite, values, vmin) - vmin) * scale
    codes = tl.minimum(tl.maximum(pos.to(tl.int32), 0), VALUE_CODES - 1)
    return tl.where(values == float("inf"), VALUE_CODES - 1, codes).to(tl.uint32)


@triton.jit
def kth_largest(values, keys, k, LANES: tl.constexpr):
    """kth_largest_key's result for keys = ordered_key(values) (NaN lanes -inf; padding lanes
    value -inf and key 0), by a radix select of the value codes and an exact finish."""
    vmin, scale = value_range(values)
    codes = value_codes(values, vmin, scale)
    code, above = radix_select(codes, k, LANES, VALUE_BITS, VALUE_DIGIT, VALUE_BINS)
    in_final = codes == code
    # The final code holds the answer and at least `need` lanes; lanes outside it have keys
    # above or below all of its keys (equal keys share a value, hence a code).
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
def chunk_codes(row, slots, n, vmin, scale, VALUES: tl.constexpr):
    """The codes a streamed select ranks for lanes `slots` of a row: value codes (VALUES, from
    vmin and scale) or the ordered keys."""
    values, keys = row_chunk(row, slots, n)
    if VALUES:
        keys = value_codes(values, vmin, scale)
    return keys


@triton.jit
def streamed_radix_select(row, n, k, lanes, vmin, scale, CHUNK: tl.constexpr,
                          VALUES: tl.constexpr, BITS: tl.constexpr, DIGIT: tl.constexpr,
                          BINS: tl.constexpr):
    """radix_select over `lanes` lanes of a row streamed from memory in CHUNK pieces (lanes >= n
    padding), of the codes chunk_codes gives: each pass sums the pieces' histograms."""
    offsets = tl.arange(0, CHUNK)
    prefix = tl.zeros((), dtype=tl.uint32)
    above = tl.zeros((), dtype=tl.int32)
    for p in tl.static_range(BITS // DIGIT):
        hist = tl.zeros((BINS,), dtype=tl.int32)
        for c0 in range(0, lanes, CHUNK):
            codes = chunk_codes(row, c0 + offsets, n, vmin, scale, VALUES)
            hist += tl.histogram(radix_digit(codes, prefix, BITS - DIGIT * (p + 1), DIGIT, BITS,
                                             BINS), BINS)
        prefix, above = pick_digit(hist, lanes, prefix, above, k, BITS - DIGIT * (p + 1), BINS)
    return prefix, above


@triton.jit
def streamed_kth_largest_key(row, n, k, lanes, CHUNK: tl.constexpr):
    """kth_largest_key over `lanes` lanes of a row streamed from memory in CHUNK pieces (lanes
    >= n padding)."""
    return streamed_radix_select(row, n, k, lanes, 0.0, 0.0, CHUNK, False, KEY_BITS, KEY_DIGIT,
                                 KEY_BINS)


@triton.jit
def streamed_code_max(row, n, lanes, vmin, scale, code, ceiling, CHUNK: tl.constexpr):
    """(largest key below `ceiling` among the lanes of value code `code`, how many lanes hold
    it), streamed; (0, lanes of the code with key 0) when none is above 0."""
    offsets = tl.arange(0, CHUNK)
    best = tl.zeros((), dtype=tl.uint32)
    count = tl.zeros((), dtype=tl.int32)
    for c0 in range(0, lanes, CHUNK):
        values, keys = row_chunk(row, c0 + offsets, n)
        take = (value_codes(values, vmin, scale) == code) & (keys < ceiling)
        chunk_best = tl.max(tl.where(take, keys, 0), axis=0)
        chunk_count = tl.sum((take & (keys == chunk_best)).to(tl.int32), axis=0)
        count = tl.where(chunk_best > best, chunk_count,
                         tl.where(chunk_best == best, count + chunk_count, count))
        best = tl.maximum(best, chunk_best)
    return best, count


@triton.jit
def streamed_kth_largest(row, n, k, lanes, CHUNK: tl.constexpr):
    """kth_largest over `lanes` lanes of a row streamed from memory in CHUNK pieces (lanes >= n
    padding): a pass for the value range, one per digit of the code, one per key the finish
    walks through (usually one), kth_largest_key's four when the finish gives up."""
    offsets = tl.arange(0, CHUNK)
    vmax = tl.full((), float("-inf"), tl.float32)
    vmin = tl.full((), float("inf"), tl.float32)
    for c0 in range(0, lanes, CHUNK):
        values, _ = row_chunk(row, c0 + offsets, n)
        finite = tl.abs(values) < float("inf")
        vmax = tl.maximum(vmax, tl.max(tl.where(finite, values, float("-inf")), axis=0))
        vmin = tl.minimum(vmin, tl.min(tl.where(finite, values, float("inf")), axis=0))
    scale = code_scale(vmin, vmax)
    code, above = streamed_radix_select(row, n, k, lanes, vmin, scale, CHUNK, True, VALUE_BITS,
                                        VALUE_DIGIT, VALUE_BINS)
    need = k - above
    # Walk the final code's distinct keys down from the top, as kth_largest does in registers.
    cur, at_cur = streamed_code_max(row, n, lanes, vmin, scale, code,
                                    tl.full((), 0xFFFFFFFF, tl.uint32), CHUNK)
    at_or_above = at_cur
    steps = tl.zeros((), dtype=tl.int32)
    while (at_or_above < need) & (steps < FINISH_STEPS):
        cur, at_cur = streamed_code_max(row, n, lanes, vmin, scale, code, cur, CHUNK)
        at_or_above += at_cur
        steps += 1
    above = above + at_or_above - at_cur
    if at_or_above < need:
        cur, above = streamed_kth_largest_key(row, n, k, lanes, CHUNK)
    return cur, above
