"""Record what each rewritten indexer site of a real model sees, to evaluate any variant on those
tensors offline.

    with capture_indexer_sites() as capture:
        compiled_model(input_ids)          # compiled with backend="misa"
    capture.save("reports/sites.safetensors")
    sites = load_sites("reports/sites.safetensors")

A site starts at every call of torch.ops.misa.dense_topk, route_heads or hisa_candidates (the
first op of each variant's chain, see kernels/indexer.py); the site's k_top and selection come
from the last op of its chain (dense_topk, routed_topk or rerank_topk); an op belongs to the
chain when it consumes the previous op's index output (heads or candidates).
Sites are numbered in call order: site_000, site_001, ...

Recording is a TorchDispatchMode, so neither the ops nor the model change. It declares
ignore_compile_internals: torch.compile then compiles as if no mode were active and the mode sees
the compiled graph's calls at run time (a plain mode would make Dynamo fall back to eager, and
the rewritten ops would never run). Tensors are copied to the CPU as they are recorded.

File format: one safetensors file with tensors "<site>.q", "<site>.k", "<site>.w", optional
"<site>.key_start", "<site>.key_end", "<site>.mask", and the site's own selection
"<site>.values", "<site>.indices"; plus a JSON sidecar (same path, suffix .json) with each
site's k_top, scale, causal flag, op chain and variant settings."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import misa_compile.kernels  # noqa: F401  (registers torch.ops.misa.*)

FORMAT = "misa-capture/1"
_ENTRY_OPS = ("dense_topk", "route_heads", "hisa_candidates")
_SELECTION_OPS = ("dense_topk", "routed_topk", "rerank_topk")
_OPTIONAL_TENSORS = ("key_start", "key_end", "mask")
# A chain continues when the next op consumes the previous op's index output through this
# argument: route_heads -> routed_topk(heads=), routed_topk / hisa_candidates ->
# rerank_topk(candidates=).
_CONSUMED_ARGUMENT = {"routed_topk": "heads", "rerank_topk": "candidates"}
_FEEDING_OPS = ("route_heads", "hisa_candidates")


@dataclass
class CapturedSite:
    """The inputs one indexer site saw and the selection it returned."""

    name: str
    q: Tensor
    k: Tensor
    w: Tensor
    k_top: Optional[int]
    scale: float = 1.0
    causal: bool = True
    key_start: Optional[Tensor] = None
    key_end: Optional[Tensor] = None
    mask: Optional[Tensor] = None
    values: Optional[Tensor] = None
    indices: Optional[Tensor] = None
    ops: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    @property
    def visibility(self) -> dict:
        """Keyword arguments of the ops (and indexer_topk) that reproduce this site's visibility."""
        return dict(causal=self.causal, key_start=self.key_start, key_end=self.key_end,
                    mask=self.mask)

    @property
    def variant(self) -> str:
        """The MisaConfig variant whose op chain this site ran."""
        if self.ops[0] == "hisa_candidates":
            return "hisa"
        if self.ops[0] == "route_heads":
            return "misa_hier" if "rerank_topk" in self.ops else "misa"
        return "dense"

    @property
    def heads(self) -> int:
        return self.q.shape[2]

    @property
    def keys(self) -> int:
        return self.k.shape[1]


class IndexerCapture(TorchDispatchMode):
    """Dispatch mode that records every misa indexer site it sees (use capture_indexer_sites)."""

    def __init__(self, to_cpu: bool = True):
        super().__init__()
        self.sites: list[CapturedSite] = []
        self._to_cpu = to_cpu
        self._chain_output: Optional[Tensor] = None

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if getattr(func, "namespace", None) == "misa":
            self._record(func, bind_op_arguments(func, args, kwargs), out)
        return out

    def _record(self, func, bound: dict, out: Any) -> None:
        op = func._schema.name.split("::", 1)[1]
        if op in _ENTRY_OPS:
            self.sites.append(self._new_site(op, bound))
        elif self._continues_site(op, bound):
            self.sites[-1].ops.append(op)
        else:
            return  # an op called outside any site's chain
        # The next op of the chain consumes this op's index output.
        self._chain_output = out[1] if op == "routed_topk" else out if op in _FEEDING_OPS else None
        site = self.sites[-1]
        _note_settings(site.settings, op, bound)
        if op in _SELECTION_OPS:
            # The router and the block filter take no scale: the selection ops carry it.
            site.k_top, site.scale = int(bound["k_top"]), float(bound["scale"])
            site.values, site.indices = (self._keep(t) for t in out)

    def _continues_site(self, op: str, bound: dict) -> bool:
        consumed = bound.get(_CONSUMED_ARGUMENT.get(op, ""))
        return self._chain_output is not None and _same_tensor(consumed, self._chain_output)

    def _new_site(self, op: str, bound: dict) -> CapturedSite:
        keep = self._keep
        return CapturedSite(
            name=f"site_{len(self.sites):03d}", q=keep(bound["q"]), k=keep(bound["k"]),
            w=keep(bound["w"]), k_top=None,
            causal=bool(bound["causal"]),
            **{name: keep(bound[name]) for name in _OPTIONAL_TENSORS if bound[name] is not None},
            ops=[op])

    def _keep(self, t: Tensor) -> Tensor:
        t = t.detach()
        return t.to("cpu", copy=True) if self._to_cpu else t.clone()

    def save(self, path: str | Path) -> Path:
        """Writes the sites to `path` (safetensors) and `path` with suffix .json; returns path."""
        return save_sites(self.sites, path)


def capture_indexer_sites(to_cpu: bool = True) -> IndexerCapture:
    """Context manager recording every misa indexer site run inside it (see the module doc)."""
    return IndexerCapture(to_cpu=to_cpu)


def save_sites(sites: list[CapturedSite], path: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    if not sites:
        raise ValueError("save_sites: no indexer site was recorded; was the model compiled with "
                         "backend='misa' and run inside capture_indexer_sites()?")
    tensors: dict[str, Tensor] = {}
    records = []
    for site in sites:
        if site.k_top is None:
            raise ValueError(f"save_sites: {site.name} never reached a selection op "
                             f"(ops seen: {site.ops})")
        for name in ("q", "k", "w", "values", "indices") + _OPTIONAL_TENSORS:
            value = getattr(site, name)
            if value is not None:
                tensors[f"{site.name}.{name}"] = value.contiguous()
        records.append(dict(name=site.name, k_top=site.k_top, scale=site.scale,
                            causal=site.causal, ops=site.ops, settings=site.settings,
                            tensors=[n for n in _OPTIONAL_TENSORS if getattr(site, n) is not None]))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": FORMAT})
    sidecar_path(path).write_text(json.dumps(dict(format=FORMAT, sites=records), indent=2) + "\n")
    return path


def load_sites(path: str | Path, device: torch.device | str = "cpu") -> list[CapturedSite]:
    """Reads the sites written by save_sites (the .safetensors file and its .json sidecar)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_sites: {path} does not exist")
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        raise FileNotFoundError(f"load_sites: the JSON sidecar {sidecar} of {path} is missing")
    meta = json.loads(sidecar.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"load_sites: {sidecar} has format {meta.get('format')!r}, expected "
                         f"{FORMAT!r}")
    tensors = load_file(str(path), device=str(device))
    sites = []
    for record in meta["sites"]:
        name = record["name"]

        def tensor(field_name: str, required: bool = True) -> Optional[Tensor]:
            key = f"{name}.{field_name}"
            if key not in tensors:
                if required:
                    raise ValueError(f"load_sites: {path} lacks tensor {key!r}")
                return None
            return tensors[key]

        sites.append(CapturedSite(
            name=name, q=tensor("q"), k=tensor("k"), w=tensor("w"), k_top=int(record["k_top"]),
            scale=float(record["scale"]), causal=bool(record["causal"]),
            key_start=tensor("key_start", "key_start" in record["tensors"]),
            key_end=tensor("key_end", "key_end" in record["tensors"]),
            mask=tensor("mask", "mask" in record["tensors"]),
            values=tensor("values", False), indices=tensor("indices", False),
            ops=list(record["ops"]), settings=dict(record["settings"])))
    return sites


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def bind_op_arguments(func, args: tuple, kwargs: dict) -> dict:
    """Argument name -> value for an op call, defaults filled in from the op's schema."""
    bound = {}
    for position, argument in enumerate(func._schema.arguments):
        if position < len(args):
            bound[argument.name] = args[position]
        elif argument.name in kwargs:
            bound[argument.name] = kwargs[argument.name]
        elif argument.has_default_value():
            bound[argument.name] = argument.default_value
        else:
            bound[argument.name] = None
    return bound


def _same_tensor(a: Any, b: Tensor) -> bool:
    return isinstance(a, Tensor) and (a is b or (a.data_ptr() == b.data_ptr()
                                                 and a.shape == b.shape and a.device == b.device))


def _note_settings(settings: dict, op: str, bound: dict) -> None:
    """The variant's own knobs, so a report can say what the model ran."""
    if op == "route_heads":
        settings.update(active_heads=int(bound["active_heads"]),
                        block_size=int(bound["block_size"]), router=str(bound["router"]))
    elif op == "hisa_candidates":
        settings.update(hisa_block=int(bound["block_size"]),
                        hisa_blocks=int(bound["num_blocks"]))
    elif op == "routed_topk":
        settings["routed_k"] = int(bound["k_top"])
