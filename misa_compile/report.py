"""What the graph pass did to each indexer-like site: rewritten into misa ops, or refused and why.
A SiteReport is returned by the pass, by `misa_compile.explain` and kept by the backend; every
record is also logged on the "misa_compile" logger."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

logger = logging.getLogger("misa_compile")

STATUSES = ("rewritten", "refused")
ROUTED_VARIANTS = ("misa", "misa_hier")  # the variants whose router keeps h of the H heads


@dataclass(frozen=True)
class SiteRecord:
    """One top-k whose input was recognised as (or looked like) a DSA lightning indexer.

    name:    where it is: the owning module path when the graph carries it, and the top-k node.
    status:  "rewritten" or "refused".
    reason:  a code from misa_compile.passes.reasons when refused, "" when rewritten.
    detail:  human-readable explanation (what was proven, or what could not be).
    heads:   H, the indexer heads (None when the site was refused before they were known).
    k_top:   keys selected per query (an int, or a string for a symbolic k).
    layout:  "batch" (q [B,S,H,D]) or "flat" (q [N,H,D]); "" when unknown.
    dtype:   dtype of the dense scores, e.g. "float32".
    mask:    the masks found in the graph: "none", "bool", "additive" or "bool+additive".
    variant: the MisaConfig variant the site was rewritten to ("" when refused).
    visibility: what the rewritten site passes the ops ("" when refused): "causal" (end-aligned,
             no mask read), "ranges" (key_start/key_end), "mask" (a mask tensor), a "+"-joined
             combination of those (e.g. "causal+mask"), or "none" (every key visible).
    active_heads: h, the heads each query keeps (H for the dense variants; None when refused).
    runs:    what executes the site: "triton", "torch: <why the Triton kernels do not>" on CUDA,
             "torch (<device>)" elsewhere; "" when refused (the graph's own ops run).
    """

    name: str
    status: str
    reason: str = ""
    detail: str = ""
    heads: Optional[int] = None
    k_top: Any = None
    layout: str = ""
    dtype: str = ""
    mask: str = ""
    variant: str = ""
    visibility: str = ""
    active_heads: Optional[int] = None
    runs: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"SiteRecord.status={self.status!r}: allowed values are {STATUSES}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SiteReport:
    """Every site found in one or more graphs."""

    sites: list[SiteRecord] = field(default_factory=list)

    @property
    def rewritten(self) -> list[SiteRecord]:
        return [s for s in self.sites if s.status == "rewritten"]

    @property
    def refused(self) -> list[SiteRecord]:
        return [s for s in self.sites if s.status == "refused"]

    def add(self, record: SiteRecord) -> SiteRecord:
        self.sites.append(record)
        _log(record)
        return record

    def merge(self, *others: "SiteReport") -> "SiteReport":
        """A new report holding this report's sites followed by the others'."""
        return SiteReport(list(self.sites) + [s for o in others for s in o.sites])

    @classmethod
    def merged(cls, reports: Iterable["SiteReport"]) -> "SiteReport":
        return cls().merge(*reports)

    def to_dict(self) -> dict[str, Any]:
        return {"rewritten": len(self.rewritten), "refused": len(self.refused),
                "sites": [s.to_dict() for s in self.sites]}

    def __len__(self) -> int:
        return len(self.sites)

    def __str__(self) -> str:
        header = (f"misa: {len(self.sites)} indexer site(s): {len(self.rewritten)} rewritten, "
                  f"{len(self.refused)} refused")
        if not self.sites:
            return header
        columns = ("site", "status", "variant/reason", "heads", "k_top", "layout", "dtype", "mask",
                   "visibility", "runs")
        rows = [(s.name, s.status, s.variant if s.status == "rewritten" else s.reason,
                 _heads_text(s), _text(s.k_top), s.layout, s.dtype, s.mask, s.visibility, s.runs)
                for s in self.sites]
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
        lines = [header, _row(columns, widths), _row(["-" * w for w in widths], widths)]
        lines += [_row(r, widths) for r in rows]
        details = [f"  {s.name}: {s.detail}" for s in self.sites if s.detail]
        return "\n".join(lines + (["details:"] + details if details else []))


def _heads_text(record: SiteRecord) -> str:
    """"h/H" when a router keeps h of the H heads (the misa variants), "H" otherwise."""
    if record.variant in ROUTED_VARIANTS and record.active_heads is not None:
        return f"{record.active_heads}/{_text(record.heads)}"
    return _text(record.heads)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _row(cells, widths) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()


def _log(record: SiteRecord) -> None:
    if record.status == "rewritten":
        logger.info("misa: rewrote indexer %s (H=%s, k=%s, %s, %s, mask=%s) to %s (heads %s, "
                    "visibility %s, runs %s)", record.name, record.heads, record.k_top,
                    record.layout, record.dtype, record.mask, record.variant,
                    _heads_text(record), record.visibility, record.runs)
    else:
        logger.info("misa: left indexer-like site %s untouched: %s (%s)", record.name,
                    record.reason, record.detail)
