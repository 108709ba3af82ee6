"""What an evaluation run measures: sizes, variants and the algorithms' key-count knobs. FULL is
the `misa eval` default; QUICK scales every key-count knob of FULL by the same factor as the
context, so the fractions of the context each variant keeps stay comparable."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from misa_compile.config import MisaConfig


@dataclass(frozen=True)
class EvalSettings:
    workload: Optional[str] = "structured"   # "structured", "isotropic" or None (no synthetic)
    lengths: tuple = (8192, 16384, 32768)    # context lengths T of the synthetic workloads
    active_heads: tuple = (4, 8, 16, 32)      # h values of the routed variants
    variants: tuple = ("dense", "misa", "misa_hier", "hisa")
    index_heads: int = 64                    # H of the synthetic indexer (DeepSeek-V3.2: 64)
    head_dim: int = 128                      # D (DeepSeek-V3.2: 128)
    queries: int = 256                       # S queries at the end of the context
    k_top: int = 2048
    layers: int = 2                          # synthetic layers (independent seeds) per length
    block_size: int = 1024                   # MISA router block
    candidates: int = 8192                   # MISA-hier candidates
    hisa_block: int = 128
    hisa_blocks: int = 64
    needle_lengths: tuple = (8192, 16384, 32768)
    needle_depths: tuple = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    needle_heads: int = 8                    # h of the MISA and MISA-hier needle panels
    needle_queries: int = 4                  # queries per needle workload (the last 2 search)
    needle_searchers: int = 2
    dtype: str = "float32"
    seed: int = 0
    # Timed calls per variant and layer, after the untimed call whose selection is measured; the
    # tables pool them over the layers of a length, so a cell's median has layers * repeats.
    repeats: int = 3

    def base_config(self) -> MisaConfig:
        return MisaConfig(block_size=self.block_size, candidates=self.candidates,
                          hisa_block=self.hisa_block, hisa_blocks=self.hisa_blocks)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


FULL = EvalSettings()
# 1/8 of FULL's context and of every key-count knob (k_top, router block, candidates, HISA
# block); H and D stay DeepSeek-V3.2's. Two timed calls per layer (four per table cell with the
# two layers) keep the median clear of one slowed call; the second costs one more indexer call
# per variant and layer, about 2 s of CPU work on top of the run's ~5 s single-threaded.
QUICK = dataclasses.replace(
    FULL, lengths=(1024, 2048, 4096), queries=64, k_top=256, block_size=128, candidates=1024,
    hisa_block=16, needle_lengths=(1024, 2048, 4096),
    needle_depths=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0), repeats=2)
