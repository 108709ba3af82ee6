"""Per-site settings (MisaConfig.sites): validated with messages naming the selector and field,
resolved by module path over layer index, kept hashable and JSON round-trippable, and applied by
the graph pass site by site: the report shows each site's h, and sites given h = H compute the
dense selection."""
from __future__ import annotations

import json
import re

import pytest
import torch

import misa_compile
from misa_compile import MisaConfig
from misa_compile.config import SITE_FIELDS
from misa_compile.models import tiny_deepseek_v32

LAYER0, LAYER1 = "model.layers.0.self_attn.indexer", "model.layers.1.self_attn.indexer"


def _raises(error, *fragments):
    return pytest.raises(error, match=".*".join(re.escape(f) for f in fragments))


@pytest.mark.parametrize("sites, error, fragments", [
    ({"x": {"active_heads": 0}}, ValueError, ["sites['x']", "active_heads=0", ">= 1"]),
    ({"x": {"variant": "fast"}}, ValueError, ["sites['x']", "variant='fast'", "allowed"]),
    ({"x": {"block_size": 8}}, ValueError, ["sites['x']", "unknown field", "block_size",
                                            str(SITE_FIELDS)]),
    ({"x": 4}, TypeError, ["sites['x'] must be a dict"]),
    ({-1: {"active_heads": 2}}, ValueError, ["layer index -1"]),
    ({2.5: {"active_heads": 2}}, TypeError, ["selector 2.5", "module path"]),
    ({"": {"active_heads": 2}}, ValueError, ["must not be empty"]),
    ({3: {"active_heads": 2}, "3": {"active_heads": 4}}, ValueError, ["given twice"]),
    ("model.layers.0", TypeError, ["MisaConfig.sites must be a dict"]),
])
def test_bad_site_settings_are_named(sites, error, fragments):
    with _raises(error, *fragments):
        MisaConfig(sites=sites)


def test_module_path_wins_over_layer_index_and_the_rest_keep_the_default():
    config = MisaConfig(active_heads=2, sites={0: {"active_heads": 4, "variant": "misa_hier"},
                                               LAYER0: {"active_heads": 8}})
    site0 = config.for_site(LAYER0 + ":topk")
    assert (site0.variant, site0.active_heads, site0.sites) == ("misa_hier", 8, ())
    assert config.for_site("model.layers.0.mlp.indexer:topk").active_heads == 4  # by layer
    other = config.for_site(LAYER1 + ":topk_1")
    assert (other.variant, other.active_heads) == ("misa", 2)
    assert config.for_site("topk").active_heads == 2  # a graph without module paths
    assert config.unmatched_selectors([LAYER1 + ":topk_1"]) == [0, LAYER0]


def test_sites_round_trip_through_json_and_stay_hashable():
    config = MisaConfig(block_size=16, sites={LAYER1: {"active_heads": 3}, "0": {"variant":
                                                                                 "dense"}})
    again, rest = MisaConfig.from_options(json.loads(json.dumps(config.to_options())))
    assert again == config and rest == {} and hash(again) == hash(config)
    assert MisaConfig(sites={0: {"variant": "dense"}}) == MisaConfig(sites={"0": {"variant":
                                                                                  "dense"}})


def _model():
    return tiny_deepseek_v32(layers=2, index_heads=8, index_topk=8, sequence_length=32)


def test_the_report_shows_each_sites_h():
    model, input_ids = _model()
    report = misa_compile.explain(model, input_ids, options={
        "active_heads": 2, "block_size": 8, "sites": {"1": {"active_heads": 4}}})
    assert [site.active_heads for site in report.rewritten] == [2, 4]
    assert "2/8" in str(report) and "4/8" in str(report)


def test_sites_given_every_head_match_dense():
    model, input_ids = _model()

    def logits(options):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="misa", options={"target": "aot_eager",
                                                                 "block_size": 8, **options})
        with torch.no_grad():
            return compiled(input_ids).logits

    dense = logits({"variant": "dense"})
    all_heads = logits({"active_heads": 1, "sites": {0: {"active_heads": 8},
                                                     LAYER1: {"active_heads": 8}}})
    one_head = logits({"active_heads": 1})
    assert misa_compile.backend.last_report().rewritten[0].active_heads == 1
    torch.testing.assert_close(all_heads, dense)
    assert not torch.allclose(one_head, dense)  # the check can fail: h = 1 changes the model
