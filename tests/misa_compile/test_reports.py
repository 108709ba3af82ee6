"""What the site report says runs: the visibility form, h/H, where each site runs; and that
last_report() covers every graph of the model compiled last, graph breaks included, with the
sites' module paths."""
from __future__ import annotations

import torch
import torch._dynamo
from torch._subclasses import FakeTensorMode

import misa_compile
from misa_compile import backend
from misa_compile.config import MisaConfig
from misa_compile.kernels.coverage import variant_fallback_reason
from misa_compile.passes.find_indexers import IndexerSite, find_indexer_sites
from misa_compile.passes.rewrite_indexers import where_it_runs
from misa_compile.report import SiteRecord, SiteReport

from ..passes.test_find_indexers import H, K, aten_graph, einsum_masked_fill, inputs
from ..passes.test_fold_visibility import indexer_scores, masked_indexer, tensors, visible_keys
from ..passes.test_rewrite_indexers import check_selection


class Indexer(torch.nn.Module):
    def forward(self, q, k, w, visible):
        return einsum_masked_fill(q, k, w, visible)


class Layer(torch.nn.Module):
    def __init__(self, graph_break: bool):
        super().__init__()
        self.indexer = Indexer()
        self.graph_break = graph_break

    def forward(self, q, k, w, visible):
        if self.graph_break:
            torch._dynamo.graph_break()
        return self.indexer(q, k, w, visible)


class TwoLayers(torch.nn.Module):
    """Layer 1 breaks the graph, so Dynamo compiles the model in several graphs."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([Layer(False), Layer(True)])

    def forward(self, q, k, w, visible):
        return [layer(q, k, w, visible) for layer in self.layers]


def compile_options(target="aot_eager", **fields):
    return dict(dict(variant="misa", active_heads=2, block_size=2, target=target), **fields)


def test_last_report_covers_every_graph_of_a_model_split_by_a_graph_break():
    backend.clear_reports()
    q, k, w, visible, _ = inputs()
    compiled = torch.compile(TwoLayers(), backend="misa", options=compile_options())
    with torch.no_grad():
        compiled(q, k, w, visible)
    assert len(backend.compiled_reports()) > 1  # several graphs...
    assert sum(len(r) for r in backend.compiled_reports()) == 2
    report = backend.last_report()          # ...one report of the whole model
    assert [r.name for r in report.rewritten] == ["layers.0.indexer:topk",
                                                  "layers.1.indexer:topk"], str(report)
    assert "2 indexer site(s)" in str(report)


def test_a_recompile_replaces_its_frames_sites_and_another_compile_starts_a_new_model():
    backend.clear_reports()
    q, k, w, visible, _ = inputs()
    compiled = torch.compile(TwoLayers(), backend="misa", options=compile_options())
    with torch.no_grad():
        compiled(q, k, w, visible)
        compiled(q.double(), k.double(), w.double(), visible)  # new dtypes: recompiles
    assert len(backend.last_report()) == 2, str(backend.last_report())
    other = torch.compile(Indexer(), backend="misa", options=compile_options())
    with torch.no_grad():
        other(q, k, w, visible)
    assert [r.name for r in backend.last_report().sites] == ["topk"]
    backend.clear_reports()
    assert len(backend.last_report()) == 0 and backend.compiled_reports() == []


def test_report_columns_say_visibility_active_heads_and_where_it_runs():
    queries, keys = 5, 7
    args = tensors(queries, keys, padding=2)
    backend.clear_reports()
    with torch.no_grad():
        torch.compile(masked_indexer(keys - queries), backend="misa", fullgraph=True,
                      options=compile_options(active_heads=2))(*args)
    (record,) = backend.last_report().sites
    assert (record.visibility, record.heads, record.active_heads, record.runs) == \
        ("causal+mask", H, 2, "torch (cpu)")
    text = str(backend.last_report())
    header, row = text.splitlines()[1], text.splitlines()[3]
    assert header.split()[-2:] == ["visibility", "runs"]
    assert "2/4" in row.split() and "causal+mask" in row and row.endswith("torch (cpu)")


def test_dense_sites_show_all_heads_and_refused_sites_leave_the_new_columns_empty():
    dense = SiteRecord("a:topk", "rewritten", heads=8, k_top=4, variant="dense",
                       visibility="causal", active_heads=8, runs="triton")
    refused = SiteRecord("b:topk", "refused", reason="not_relu", heads=8)
    rows = str(SiteReport([dense, refused])).splitlines()[3:5]
    assert rows[0].split()[3] == "8" and rows[0].endswith("causal      triton")
    assert rows[1].split() == ["b:topk", "refused", "not_relu", "8"]


def test_where_it_runs_reads_the_device_from_the_graph_and_the_kernel_coverage():
    q, k, w, visible, _ = inputs()
    (site,) = [s for s in find_indexer_sites(aten_graph(einsum_masked_fill, q, k, w, visible))
               if isinstance(s, IndexerSite)]
    assert where_it_runs(site, "misa", MisaConfig()) == "torch (cpu)"
    scores = site.topk.args[0]
    with FakeTensorMode():  # the same graph, as if traced on a GPU
        scores.meta["val"] = torch.empty(tuple(scores.meta["val"].shape), device="cuda")
    assert where_it_runs(site, "misa", MisaConfig()) == "triton"
    reason = variant_fallback_reason("misa", "qnorm")
    assert where_it_runs(site, "misa", MisaConfig(router="qnorm")) == f"torch: {reason}"


def test_inductor_compiles_a_folded_causal_site_and_equals_eager():
    queries, keys = 5, 7
    args = tensors(queries, keys, padding=3)
    torch._dynamo.reset()
    compiled = torch.compile(masked_indexer(keys - queries), backend="misa", fullgraph=True,
                             options={"active_heads": H, "block_size": 2})
    with torch.no_grad():
        indices = compiled(*args)
    q, k, w, keep = args
    check_selection(indices, indexer_scores(q, k, w).masked_fill(
        ~visible_keys(queries, keys, keys - queries, keep=keep), float("-inf")))
    (record,) = misa_compile.backend.last_report().rewritten
    assert (record.visibility, record.k_top, record.runs) == ("causal+mask", K, "torch (cpu)")
