"""Capture of indexer sites: each variant's op chain becomes one site in call order, the file
round-trips exactly, and the captured tensors re-evaluated with the dense variant reproduce the
selection the model itself made (as sets, compared through float64 gathered scores where the
k_top boundary is tied). The model test runs the transformers DeepSeek-V3.2 tiny model compiled
with backend="misa"."""
from __future__ import annotations

import json

import pytest
import torch

from misa_compile.config import MisaConfig
from misa_compile.eval.capture import capture_indexer_sites, load_sites, sidecar_path
from misa_compile.kernels import indexer_topk, reference

CONFIGS = {
    "dense": MisaConfig(variant="dense"),
    "misa": MisaConfig(variant="misa", active_heads=2, block_size=8),
    "misa_hier": MisaConfig(variant="misa_hier", active_heads=2, block_size=8, candidates=12),
    "hisa": MisaConfig(variant="hisa", hisa_block=4, hisa_blocks=3),
}


def inputs(seed=0, queries=8, keys=40, heads=4, dim=16):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(1, queries, heads, dim, generator=gen),
            torch.randn(1, keys, dim, generator=gen), torch.randn(1, queries, heads, generator=gen))


def finite_sets(values, indices):
    return [{int(i) for i, v in zip(row_i, row_v) if torch.isfinite(v)}
            for row_i, row_v in zip(indices.flatten(0, -2), values.flatten(0, -2))]


def assert_same_selection(scores, chosen, expected, k_top):
    """`chosen` and `expected` index sets [B,S,k] select keys of equal float64 scores (ties may
    swap keys of equal score) and are equal as sets wherever the boundary is not tied."""
    scores = scores.flatten(0, -2)
    chosen, expected = chosen.flatten(0, -2).long(), expected.flatten(0, -2).long()
    finite = torch.isfinite(scores)
    for row in range(scores.shape[0]):
        a = {int(i) for i in chosen[row] if finite[row, i]}
        b = {int(i) for i in expected[row] if finite[row, i]}
        got = sorted(scores[row, list(a)].tolist())
        want = sorted(scores[row, list(b)].tolist())
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), row
        ranked = scores[row][finite[row]].sort(descending=True).values
        if ranked.numel() <= k_top or ranked[k_top - 1] - ranked[k_top] > 1e-4:
            assert a == b, row


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_each_variant_chain_is_one_site(variant):
    q, k, w = inputs()
    with capture_indexer_sites() as capture:
        values, indices = indexer_topk(q, k, w, 6, CONFIGS[variant], scale=0.5)
    (site,) = capture.sites
    assert site.name == "site_000" and site.variant == variant and site.k_top == 6
    assert site.scale == 0.5 and site.causal is True and site.mask is None
    assert torch.equal(site.q, q) and torch.equal(site.k, k) and torch.equal(site.w, w)
    assert torch.equal(site.values, values) and torch.equal(site.indices, indices)


def test_sites_are_numbered_in_call_order_and_unrelated_ops_are_ignored():
    q, k, w = inputs()
    with capture_indexer_sites() as capture:
        for variant in CONFIGS:
            indexer_topk(q, k, w, 6, CONFIGS[variant])
        # A routed_topk whose heads did not come from route_heads starts no site and joins none.
        torch.ops.misa.routed_topk(q, k, w, torch.zeros(1, 8, 1, dtype=torch.long), 3)
    assert [s.name for s in capture.sites] == [f"site_{i:03d}" for i in range(4)]
    assert [s.variant for s in capture.sites] == list(CONFIGS)
    assert capture.sites[3].ops == ["hisa_candidates", "rerank_topk"]
    assert capture.sites[2].settings == dict(active_heads=2, block_size=8, router="score",
                                             routed_k=12)


def test_file_round_trip_keeps_tensors_and_visibility(tmp_path):
    q, k, w = inputs(queries=5, keys=30)
    starts = torch.tensor([[0, 3, 5, 0, 2]])
    ends = torch.tensor([[10, 20, 30, 4, 30]])
    mask = torch.zeros(1, 5, 30)
    mask[..., 7] = float("-inf")
    with capture_indexer_sites() as capture:
        indexer_topk(q.bfloat16(), k.bfloat16(), w.bfloat16(), 4, CONFIGS["misa"],
                     causal=False, key_start=starts, key_end=ends)
        indexer_topk(q, k, w, 4, CONFIGS["dense"], mask=mask)
    path = capture.save(tmp_path / "sites.safetensors")
    meta = json.loads(sidecar_path(path).read_text())
    assert [s["k_top"] for s in meta["sites"]] == [4, 4]
    loaded = load_sites(path)
    for original, site in zip(capture.sites, loaded):
        assert site.name == original.name and site.variant == original.variant
        assert (site.k_top, site.scale, site.causal) == (original.k_top, original.scale,
                                                         original.causal)
        for name in ("q", "k", "w", "key_start", "key_end", "mask", "values", "indices"):
            a, b = getattr(original, name), getattr(site, name)
            assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), name
    assert loaded[0].q.dtype == torch.bfloat16 and loaded[0].causal is False


def test_replayed_dense_selection_equals_the_recorded_one(tmp_path):
    q, k, w = inputs(seed=3, queries=12, keys=64)
    with capture_indexer_sites() as capture:
        indexer_topk(q, k, w, 10, CONFIGS["dense"], scale=0.25)
    (site,) = load_sites(capture.save(tmp_path / "s.safetensors"))
    values, indices = indexer_topk(site.q, site.k, site.w, site.k_top, MisaConfig(variant="dense"),
                                   scale=site.scale, **site.visibility)
    assert finite_sets(values, indices) == finite_sets(site.values, site.indices)


def test_capture_sees_ops_inside_a_compiled_graph():
    q, k, w = inputs()

    def indexer(q, k, w):
        return indexer_topk(q * 2, k, w, 6, CONFIGS["misa_hier"])

    compiled = torch.compile(indexer, backend="aot_eager", fullgraph=True)
    compiled(q, k, w)
    with capture_indexer_sites() as capture:
        values, indices = compiled(q, k, w)
    (site,) = capture.sites
    assert site.variant == "misa_hier" and torch.equal(site.q, q * 2)
    assert torch.equal(site.indices, indices)


def test_save_without_sites_and_missing_files_are_clear_errors(tmp_path):
    with capture_indexer_sites() as capture:
        pass
    with pytest.raises(ValueError, match="no indexer site was recorded"):
        capture.save(tmp_path / "none.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sites(tmp_path / "absent.safetensors")
    q, k, w = inputs()
    with capture_indexer_sites() as capture:
        indexer_topk(q, k, w, 6, CONFIGS["dense"])
    path = capture.save(tmp_path / "one.safetensors")
    sidecar_path(path).unlink()
    with pytest.raises(FileNotFoundError, match="JSON sidecar"):
        load_sites(path)


# ---------------------------------------------------------------------------------------------
# The real model: transformers DeepSeek-V3.2 (tiny random config), compiled with backend="misa".

LAYERS, HEADS, TOPK, SEQ = 2, 8, 8, 32


def test_capture_from_compiled_deepseek_v32_reproduces_the_models_own_selection(tmp_path):
    from misa_compile.models import tiny_deepseek_v32

    model, input_ids = tiny_deepseek_v32(layers=LAYERS, index_heads=HEADS, index_topk=TOPK,
                                         seed=0, sequence_length=SEQ)
    eager = []
    hooks = [layer.self_attn.indexer.register_forward_hook(
        lambda module, args, out: eager.append(out)) for layer in model.model.layers]
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(eager) == LAYERS

    compiled = torch.compile(model, backend="misa",
                             options={"variant": "dense", "target": "aot_eager"})
    with torch.no_grad():
        compiled(input_ids)
        with capture_indexer_sites() as capture:
            compiled(input_ids)
    path = capture.save(tmp_path / "deepseek.safetensors")
    sites = load_sites(path)
    assert [s.name for s in sites] == [f"site_{i:03d}" for i in range(LAYERS)]
    for site, model_selection in zip(sites, eager):
        assert site.variant == "dense" and site.k_top == TOPK
        assert site.q.shape == (1, SEQ, HEADS, model.config.index_head_dim)
        assert site.k.shape == (1, SEQ, model.config.index_head_dim)
        values, indices = indexer_topk(site.q, site.k, site.w, site.k_top,
                                       MisaConfig(variant="dense"), scale=site.scale,
                                       **site.visibility)
        scores = reference.dense_scores(site.q, site.k, site.w, site.scale, **site.visibility)
        # Some queries see fewer than k_top keys: only finite-score entries are compared.
        assert_same_selection(scores, indices, model_selection, TOPK)
        assert_same_selection(scores, indices, site.indices, TOPK)
        assert int(torch.isfinite(values).all(-1).sum()) >= SEQ - TOPK
