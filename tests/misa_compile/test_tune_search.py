"""The tuner on generated layers with planted head redundancy: it picks a smaller h for the
redundant layer, the choice meets the target on the held-out queries, the tuned config addresses
every site, and the cost model ranks settings as their FLOPs do."""
from __future__ import annotations

import json
import math

import pytest
import torch

from misa_compile.config import MisaConfig
from misa_compile.tune import CostModel, MeasuredTimes, TuneSettings, relative_flops, tune_sites
from misa_compile.tune.cost import SiteShape
from misa_compile.tune.report import write_outputs
from misa_compile.tune.search import split_queries

from .tune_planted import planted_site

TARGET = 0.9


@pytest.fixture(scope="module")
def tuned():
    sites = [planted_site("model.layers.0.indexer:topk", 0, redundant=True),
             planted_site("model.layers.1.indexer:topk", 1, redundant=False)]
    return sites, tune_sites(sites, TuneSettings(target_recall=TARGET, block_size=64))


def test_redundant_layer_gets_fewer_heads_and_both_meet_the_target_held_out(tuned):
    _, result = tuned
    redundant, diverse = result.sites
    assert redundant.chosen.variant == "misa" and redundant.chosen.active_heads == 1
    assert diverse.chosen.variant != "dense"
    assert diverse.chosen.cost > redundant.chosen.cost
    assert diverse.chosen.active_heads > redundant.chosen.active_heads
    for site in result.sites:
        assert site.chosen.tune_recall >= TARGET
        assert site.chosen.held_out_recall >= TARGET
        assert site.held_out_queries > 0 and site.tune_queries > 0


def test_choice_is_the_cheapest_point_that_meets_the_target(tuned):
    _, result = tuned
    for site in result.sites:
        feasible = [p for p in site.points if p.tune_recall >= TARGET]
        assert site.chosen.cost == min(p.cost for p in feasible)
        # The next smaller h measured misses the target, or there is none.
        smaller = [p for p in site.points if p.variant == "misa"
                   and p.active_heads < site.chosen.active_heads]
        assert all(p.tune_recall < TARGET for p in smaller)


def test_tuned_config_runs_each_site_with_its_choice(tuned):
    sites, result = tuned
    config, _ = MisaConfig.from_options(json.loads(json.dumps(result.config.to_options())))
    for site, tuned_site in zip(sites, result.sites):
        effective = config.for_site(site.name)
        assert (effective.variant, effective.active_heads) == (
            tuned_site.chosen.variant, tuned_site.chosen.active_heads)
    assert result.relative_cost("chosen") < result.relative_cost("baseline") < 1.0


def test_halves_alternate_over_the_informative_queries():
    site = planted_site("s", 0, redundant=False, queries=40, keys=64, k_top=32)
    tune, held = split_queries(site)
    assert not (tune & held).any()
    # End-aligned causal: query i sees 64 - 40 + 1 + i keys; informative ones see more than 32.
    informative = torch.arange(40) + 25 > 32
    assert torch.equal((tune | held)[0], informative)
    assert abs(int(tune.sum()) - int(held.sum())) <= 1


def test_reports_are_written(tuned, tmp_path):
    _, result = tuned
    written = write_outputs(result, tmp_path, "planted workload")
    data = json.loads(written["data"].read_text())
    assert data["speedup"]["over_dense"] == pytest.approx(1 / result.relative_cost("chosen"))
    assert [s["chosen"]["active_heads"] for s in data["sites"]] == [
        s.chosen.active_heads for s in result.sites]
    assert "over uniform h=8" in written["report"].read_text()
    assert written["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flops_cost_orders_the_settings():
    shape = SiteShape(heads=64, keys=65536, dim=128, block_size=1024)
    assert relative_flops("dense", shape) == 1.0
    costs = [relative_flops("misa", shape, h) for h in (1, 2, 4, 8, 16, 32, 64)]
    assert costs == sorted(costs) and costs[-1] > 1.0  # h = H pays the router on top of dense
    assert relative_flops("misa", shape, 8) == pytest.approx(1 / 7.9, rel=0.02)
    assert (relative_flops("misa_hier", shape, 8, 8192)
            > relative_flops("misa", shape, 8) + 8192 / 65536 * 0.99)


def test_measured_times_interpolate_and_clamp(tmp_path):
    path = tmp_path / "times.json"
    path.write_text(json.dumps({"dense": 20.0, "misa": {"4": 5.0, "8": 7.0}}))
    model = CostModel(MeasuredTimes.from_file(path))
    shape = SiteShape(heads=64, keys=65536, dim=128, block_size=1024)
    assert model.relative("misa", shape, 6) == pytest.approx(6.0 / 20)
    assert model.relative("misa", shape, 1) == pytest.approx(5.0 / 20)   # clamped, not cheaper
    assert model.relative("misa_hier", shape, 8, 8192) == relative_flops("misa_hier", shape, 8,
                                                                         8192)
    path.write_text(json.dumps({"dense": 20.0, "misa": {}}))
    with pytest.raises(ValueError, match="no 'misa' times"):
        MeasuredTimes.from_file(path)


@pytest.mark.parametrize("kwargs, message", [
    ({"target_recall": 0.0}, "target_recall=0.0"), ({"target_recall": 1.5}, "target_recall"),
    ({"metric": "median"}, "metric='median'"), ({"heads": (0,)}, "heads")])
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TuneSettings(**kwargs)


def test_p10_metric_is_not_above_the_mean(tuned):
    sites, _ = tuned
    mean = tune_sites(sites[1:], TuneSettings(target_recall=TARGET, block_size=64)).sites[0]
    p10 = tune_sites(sites[1:], TuneSettings(target_recall=TARGET, block_size=64,
                                             metric="p10")).sites[0]
    for a, b in zip(mean.points, p10.points):
        assert math.isnan(a.tune_recall) or b.tune_recall <= a.tune_recall + 1e-12
    assert p10.chosen.cost >= mean.chosen.cost
