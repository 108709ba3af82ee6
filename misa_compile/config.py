"""The one configuration object of misa-compile, shared by the ops' callers, the graph pass, export
and the command line. Every field is validated when the object is made, so a bad value fails at the
user's call with a message naming the field and the allowed range, never deep inside a kernel."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

VARIANTS = ("dense", "misa", "misa_hier", "hisa")
ROUTERS = ("score", "qnorm")
# The fields one indexer site may set for itself (MisaConfig.sites); the rest are model-wide.
SITE_FIELDS = ("variant", "active_heads", "candidates")


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
    sites:        per-site settings, {selector: {field: value}} with fields from SITE_FIELDS
                  ("variant", "active_heads", "candidates"); every other site keeps the fields
                  above. A selector is a site's module path as the report prints it (e.g.
                  "model.layers.0.self_attn.indexer", or the full "path:topk" name) or a layer
                  index: an int, or a string of digits (JSON keys are strings), matching the sites
                  whose module path's first numeric component is that number ("layers.3" -> 3).
                  Where both match one site, the module path's settings win. Stored as a sorted
                  tuple of (selector, ((field, value), ...)) so the config stays hashable;
                  for_site() gives the config one site runs with.
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
    sites: Any = ()

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
        object.__setattr__(self, "sites", _normalised_sites(self.sites))
        for selector, overrides in self.sites:
            try:
                dataclasses.replace(self, sites=(), **dict(overrides))
            except (TypeError, ValueError) as error:
                raise type(error)(f"MisaConfig.sites[{selector!r}]: {error}") from error

    def for_site(self, site_name: str) -> "MisaConfig":
        """The config the site named `site_name` (as the report prints it, "path:node" or a bare
        module path) runs with: this one with its matching `sites` entries applied, and no
        per-site table left."""
        if not self.sites:
            return self
        path = site_module_path(site_name)
        layer = site_layer_index(site_name)
        merged: dict[str, Any] = {}
        # Layer-index entries first, so a module path's settings override them.
        for by_name in (False, True):
            for selector, overrides in self.sites:
                matches = (selector in (site_name, path) if by_name
                           else layer is not None and selector == layer)
                if matches and isinstance(selector, str) == by_name:
                    merged.update(overrides)
        return dataclasses.replace(self, sites=(), **merged)

    def unmatched_selectors(self, site_names) -> list:
        """The `sites` selectors that match none of `site_names` (a setting that applies
        nowhere, most likely a misspelt module path)."""
        names = list(site_names)
        paths = {site_module_path(name) for name in names} | set(names)
        layers = {site_layer_index(name) for name in names}
        return [selector for selector, _ in self.sites
                if selector not in (layers if isinstance(selector, int) else paths)]

    def to_options(self) -> dict[str, Any]:
        """The fields that differ from the defaults as a JSON-ready dict (sites as
        {selector: {field: value}}); MisaConfig.from_options(config.to_options()) gives the
        config back."""
        options: dict[str, Any] = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if value != item.default:
                options[item.name] = value
        if self.sites:
            options["sites"] = {str(selector): dict(overrides) for selector, overrides in self.sites}
        return options

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


def site_module_path(site_name: str) -> str:
    """"model.layers.0.self_attn.indexer" of "model.layers.0.self_attn.indexer:topk"."""
    return site_name.rsplit(":", 1)[0]


def site_layer_index(site_name: str) -> int | None:
    """The first all-digit component of the site's module path ("model.layers.3.attn" -> 3), the
    layer index of a decoder stack; None when the path has none."""
    for part in site_module_path(site_name).split("."):
        if part.isdigit():
            return int(part)
    return None


def _normalised_sites(sites: Any) -> tuple:
    """`sites` as a sorted tuple of (selector, ((field, value), ...)), from a mapping or such a
    tuple; refuses bad selectors and fields other than SITE_FIELDS, naming them."""
    if isinstance(sites, Mapping):
        items = list(sites.items())
    elif isinstance(sites, (tuple, list)) and all(
            isinstance(item, (tuple, list)) and len(item) == 2 for item in sites):
        items = [tuple(item) for item in sites]
    else:
        raise TypeError(f"MisaConfig.sites must be a dict {{selector: {{field: value}}}}, got "
                        f"{type(sites).__name__}")
    normalised: dict[Any, tuple] = {}
    for selector, overrides in items:
        key = _selector(selector)
        if key in normalised:
            raise ValueError(f"MisaConfig.sites: selector {selector!r} is given twice (layer "
                             "indices may be written as an int or as digits, not both)")
        if isinstance(overrides, (tuple, list)):
            overrides = dict(overrides)
        if not isinstance(overrides, Mapping):
            raise TypeError(f"MisaConfig.sites[{selector!r}] must be a dict of settings, got "
                            f"{type(overrides).__name__}")
        unknown = sorted(set(overrides) - set(SITE_FIELDS))
        if unknown:
            raise ValueError(f"MisaConfig.sites[{selector!r}]: unknown field(s) {unknown}; a site "
                             f"may set {SITE_FIELDS}")
        normalised[key] = tuple(sorted(overrides.items()))
    # Ints before strings, so the order (and repr, part of the compile cache key) is stable.
    return tuple(sorted(normalised.items(), key=lambda item: (isinstance(item[0], str),
                                                              item[0])))


def _selector(selector: Any) -> int | str:
    if isinstance(selector, str) and selector.isdigit():
        selector = int(selector)
    if isinstance(selector, bool) or not isinstance(selector, (int, str)):
        raise TypeError(f"MisaConfig.sites: selector {selector!r} must be a module path (str) or "
                        f"a layer index (int), got {type(selector).__name__}")
    if isinstance(selector, int) and selector < 0:
        raise ValueError(f"MisaConfig.sites: layer index {selector} must be >= 0")
    if isinstance(selector, str) and not selector.strip():
        raise ValueError("MisaConfig.sites: a selector must not be empty")
    return selector


def _require_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"MisaConfig.{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"MisaConfig.{name}={value}: must be >= {minimum}")
