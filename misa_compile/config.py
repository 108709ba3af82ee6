"""The one configuration object of misa-compile, shared by the ops' callers, the graph pass, export
and the command line. Every field is validated when the object is made, so a bad value fails at the
user's call with a message naming the field and the allowed range, never deep inside a kernel."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

VARIANTS = ("dense", "misa", "misa_hier", "hisa")
ROUTERS = ("score", "qnorm")


@dataclass(frozen=True)
class MisaConfig:
    """How an indexer site is replaced.

    variant:      "dense" (all heads, exact), "misa" (router + h routed heads), "misa_hier"
                  (routed candidates re-ranked with all heads) or "hisa" (block filter + exact
                  refinement, the published baseline).
    active_heads: h, heads each query keeps (MISA variants); must be in [1, H] for the model's H.
    block_size:   B, keys pooled per router block (MISA variants).
    candidates:   n_cand, routed candidates re-ranked by "misa_hier"; must be >= the site's k_top.
    hisa_block:   keys per HISA block.
    hisa_blocks:  m, blocks HISA keeps per query (besides the always-kept first and own block).
    router:       "score" (|w|·Σ ReLU(q·kbar), the paper's router) or "qnorm" (||q||, ablation).
    min_keys:     sites whose key count is statically known and below this run dense (routing
                  does not pay on short contexts); 0 disables the fallback.
    query_chunk:  queries processed at once by the CPU implementation; 0 picks it from a memory
                  budget. Results do not depend on it.
    context_parallel: the graph pass emits the sharded indexer (misa::sharded_topk,
                  misa_compile.distributed) instead of the single-device chain. Each indexer site
                  then sees this rank's contiguous shard of the keys, the shards laid out in rank
                  order of the default torch.distributed process group (which must be
                  initialised), and the same queries and weights on every rank; the rewritten site
                  returns the GLOBAL top-k with GLOBAL key indices, the same on every rank. Variants
                  "dense", "misa" and "misa_hier"; sites whose visibility is a mask tensor are left
                  untouched. min_keys does not apply (the global key count is known at run time
                  only).
    """

    variant: str = "misa"
    active_heads: int = 8
    block_size: int = 1024
    candidates: int = 8192
    hisa_block: int = 128
    hisa_blocks: int = 64
    router: str = "score"
    min_keys: int = 0
    query_chunk: int = 0
    context_parallel: bool = False

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"MisaConfig.variant={self.variant!r}: allowed values are {VARIANTS}")
        if self.router not in ROUTERS:
            raise ValueError(f"MisaConfig.router={self.router!r}: allowed values are {ROUTERS}")
        _require_int("active_heads", self.active_heads, 1)
        _require_int("block_size", self.block_size, 1)
        _require_int("candidates", self.candidates, 1)
        _require_int("hisa_block", self.hisa_block, 1)
        _require_int("hisa_blocks", self.hisa_blocks, 1)
        _require_int("min_keys", self.min_keys, 0)
        _require_int("query_chunk", self.query_chunk, 0)
        if not isinstance(self.context_parallel, bool):
            raise TypeError(f"MisaConfig.context_parallel must be a bool (True or False), got "
                            f"{type(self.context_parallel).__name__}")

    def check_site(self, num_heads: int, k_top: int) -> None:
        """Checks the fields that depend on a site: active heads against its H, candidates
        against its k_top."""
        if self.variant in ("misa", "misa_hier") and not 1 <= self.active_heads <= num_heads:
            raise ValueError(
                f"MisaConfig.active_heads={self.active_heads}: must be in [1, H] = [1, {num_heads}] "
                "for this indexer")
        if self.variant == "misa_hier" and self.candidates < k_top:
            raise ValueError(
                f"MisaConfig.candidates={self.candidates}: must be >= k_top={k_top} so the "
                "re-rank can return k_top keys")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> tuple["MisaConfig", dict[str, Any]]:
        """Splits a flat options dict (as given to torch.compile or the CLI) into a MisaConfig
        and the remaining, non-algorithm options. A "config" key may hold a ready MisaConfig."""
        options = dict(options or {})
        config = options.pop("config", None)
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {key: options.pop(key) for key in list(options) if key in names}
        if config is None:
            config = cls(**fields)
        elif not isinstance(config, cls):
            raise TypeError(f"options['config'] must be a MisaConfig, got {type(config).__name__}")
        elif fields:
            config = dataclasses.replace(config, **fields)
        return config, options


def _require_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"MisaConfig.{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"MisaConfig.{name}={value}: must be >= {minimum}")
