"""The variants an evaluation compares with the dense indexer, each a MisaConfig with a name."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

from misa_compile.config import VARIANTS, MisaConfig

ROUTED = ("misa", "misa_hier")


@dataclass(frozen=True)
class VariantSpec:
    key: str            # stable id used in JSON: "dense", "misa_h8", "misa_hier_h8", "hisa"
    label: str          # for tables and images: "MISA h=8"
    config: MisaConfig

    def config_for(self, k_top: int) -> MisaConfig:
        """The config at a site with this k_top: misa_hier needs at least k_top candidates."""
        if self.config.variant == "misa_hier" and self.config.candidates < k_top:
            return dataclasses.replace(self.config, candidates=k_top)
        return self.config


def variant_specs(variants: Sequence[str], active_heads: Sequence[int], num_heads: int,
                  base: MisaConfig) -> tuple[list[VariantSpec], list[str]]:
    """Dense first (the reference), then each requested variant; routed variants once per h.
    Returns (specs, notes) where notes say which h were skipped because they exceed H."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"variants {unknown}: allowed values are {VARIANTS}")
    bad = [h for h in active_heads if isinstance(h, bool) or not isinstance(h, int) or h < 1]
    if bad:
        raise ValueError(f"active heads {bad}: every h must be an int >= 1")
    specs = [VariantSpec("dense", "dense", dataclasses.replace(base, variant="dense"))]
    notes = []
    skipped = sorted({h for h in active_heads if h > num_heads})
    if skipped and any(v in ROUTED for v in variants):
        notes.append(f"h = {', '.join(map(str, skipped))} skipped: larger than the indexer's "
                     f"H = {num_heads} heads")
    for variant in ("misa", "misa_hier"):
        if variant not in variants:
            continue
        for h in sorted(set(active_heads)):
            if h > num_heads:
                continue
            label = f"{'MISA' if variant == 'misa' else 'MISA-hier'} h={h}"
            specs.append(VariantSpec(f"{variant}_h{h}", label,
                                     dataclasses.replace(base, variant=variant, active_heads=h)))
    if "hisa" in variants:
        specs.append(VariantSpec("hisa", "HISA", dataclasses.replace(base, variant="hisa")))
    return specs, notes
