"""The k-th largest order-preserving 32-bit key (common.ordered_key) by radix select: four passes
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

BINS = tl.constexpr(256)


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
