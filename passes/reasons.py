"""Why an indexer-like site was left untouched. The codes are stable strings: reports, logs and tests
compare against them, so a code is never renamed, only added."""
from __future__ import annotations

NEGATIVE_SCALE = "negative_scale"
UNKNOWN_SCALE = "unknown_scale"
NOT_RELU = "not_relu"
PER_HEAD_KEYS = "per_head_keys"
REDUCTION_NOT_OVER_HEADS = "reduction_not_over_heads"
TOPK_NOT_KEY_AXIS = "topk_not_key_axis"
SMALLEST_TOPK = "smallest_topk"
UNKNOWN_MASK = "unknown_mask"
SCORES_USED_ELSEWHERE = "scores_used_elsewhere"
UNSUPPORTED_LAYOUT = "unsupported_layout"
ROUNDING_CAST = "rounding_cast"
CONFIG_MISMATCH = "config_mismatch"
INTERNAL_ERROR = "internal_error"

DESCRIPTIONS = {
    NEGATIVE_SCALE: "a negative factor scales the score (it reverses the ranking)",
    UNKNOWN_SCALE: "a factor of unknown sign scales the score",
    NOT_RELU: "the per-head activation is not ReLU",
    PER_HEAD_KEYS: "the key differs per head (the indexer needs one key shared by all heads)",
    REDUCTION_NOT_OVER_HEADS: "the weighted sum runs over an axis other than the heads",
    TOPK_NOT_KEY_AXIS: "top-k runs over an axis other than the keys",
    SMALLEST_TOPK: "top-k selects the smallest scores",
    UNKNOWN_MASK: "a mask whose meaning could not be proven",
    SCORES_USED_ELSEWHERE: "the dense scores have other users, so they cannot be removed",
    UNSUPPORTED_LAYOUT: "a layout or operation the rewrite does not handle",
    ROUNDING_CAST: "a cast rounds the score where the rounding can change the selection",
    CONFIG_MISMATCH: "the configuration does not fit this indexer",
    INTERNAL_ERROR: "the pass failed unexpectedly on this site and left it untouched",
}

CODES = tuple(DESCRIPTIONS)


class SiteRefused(Exception):
    """Raised while proving a site: the site is indexer-like but must be left untouched."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in DESCRIPTIONS:
            raise ValueError(f"unknown refusal reason {reason!r}; known: {CODES}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
