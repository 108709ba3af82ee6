"""MisaConfig: every field validated at construction with a message naming it and the allowed
range, the site checks (active heads against H, candidates against k_top), and the split of a flat
options dict into a config and the remaining options."""
from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from misa_compile import MisaConfig
from misa_compile.config import ROUTERS, VARIANTS

from ..kernels.strategies import PROPERTY_SETTINGS

# field -> the smallest allowed value
INT_FIELDS = {"active_heads": 1, "block_size": 1, "candidates": 1, "hisa_block": 1,
              "hisa_blocks": 1, "min_keys": 0, "query_chunk": 0}


def _raises(error, *fragments):
    return pytest.raises(error, match=".*".join(re.escape(f) for f in fragments))


def test_defaults_are_the_papers():
    config = MisaConfig()
    assert (config.variant, config.active_heads, config.block_size, config.candidates,
            config.hisa_block, config.hisa_blocks, config.router) == (
        "misa", 8, 1024, 8192, 128, 64, "score")


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        MisaConfig().active_heads = 4


@pytest.mark.parametrize("field, minimum", INT_FIELDS.items())
def test_int_field_below_its_minimum_is_named(field, minimum):
    with _raises(ValueError, f"MisaConfig.{field}={minimum - 1}", f">= {minimum}"):
        MisaConfig(**{field: minimum - 1})
    assert getattr(MisaConfig(**{field: minimum}), field) == minimum


@pytest.mark.parametrize("field", INT_FIELDS)
@pytest.mark.parametrize("value", [2.0, "8", True, None])
def test_int_field_of_another_type_is_named(field, value):
    with _raises(TypeError, f"MisaConfig.{field} must be an int", type(value).__name__):
        MisaConfig(**{field: value})


@pytest.mark.parametrize("field, value, allowed", [
    ("variant", "sparse", VARIANTS), ("variant", "MISA", VARIANTS), ("router", "norm", ROUTERS)])
def test_unknown_choice_lists_the_allowed_values(field, value, allowed):
    with _raises(ValueError, f"MisaConfig.{field}={value!r}", str(allowed)):
        MisaConfig(**{field: value})


def test_unknown_field_is_refused():
    with pytest.raises(TypeError, match="heads"):
        MisaConfig(heads=8)


@pytest.mark.parametrize("variant", ["misa", "misa_hier"])
def test_check_site_bounds_active_heads_by_h(variant):
    MisaConfig(variant=variant, active_heads=4, candidates=64).check_site(num_heads=4, k_top=64)
    with _raises(ValueError, "MisaConfig.active_heads=5", "[1, H] = [1, 4]"):
        MisaConfig(variant=variant, active_heads=5, candidates=64).check_site(4, 64)


def test_check_site_needs_candidates_at_least_k_top_for_misa_hier():
    MisaConfig(variant="misa_hier", candidates=2048).check_site(num_heads=64, k_top=2048)
    with _raises(ValueError, "MisaConfig.candidates=2047", "k_top=2048"):
        MisaConfig(variant="misa_hier", candidates=2047).check_site(64, 2048)


@pytest.mark.parametrize("variant", ["dense", "hisa"])
def test_check_site_ignores_routing_fields_of_variants_without_routing(variant):
    MisaConfig(variant=variant, active_heads=64, candidates=1).check_site(num_heads=8, k_top=2048)


def test_candidates_are_not_checked_for_plain_misa():
    MisaConfig(variant="misa", candidates=1).check_site(num_heads=8, k_top=2048)


def test_from_options_splits_config_fields_from_other_options():
    config, rest = MisaConfig.from_options({"variant": "hisa", "hisa_blocks": 16,
                                            "target": "inductor", "report": True})
    assert config == MisaConfig(variant="hisa", hisa_blocks=16)
    assert rest == {"target": "inductor", "report": True}


def test_from_options_without_options_gives_the_defaults():
    assert MisaConfig.from_options(None) == (MisaConfig(), {})
    assert MisaConfig.from_options({}) == (MisaConfig(), {})


def test_from_options_overrides_a_given_config():
    base = MisaConfig(variant="misa_hier", candidates=4096)
    config, rest = MisaConfig.from_options({"config": base, "active_heads": 4, "x": 1})
    assert config == dataclasses.replace(base, active_heads=4)
    assert rest == {"x": 1}
    assert MisaConfig.from_options({"config": base})[0] is base


def test_from_options_refuses_a_config_of_another_type():
    with _raises(TypeError, "options['config'] must be a MisaConfig", "dict"):
        MisaConfig.from_options({"config": {"variant": "dense"}})


def test_from_options_validates_the_fields():
    with _raises(ValueError, "MisaConfig.block_size=0"):
        MisaConfig.from_options({"block_size": 0})
    with _raises(ValueError, "MisaConfig.variant='fast'"):
        MisaConfig.from_options({"config": MisaConfig(), "variant": "fast"})


def test_from_options_leaves_the_callers_dict_alone():
    options = {"variant": "dense", "target": "eager"}
    MisaConfig.from_options(options)
    assert options == {"variant": "dense", "target": "eager"}


VALID_CONFIGS = st.builds(
    MisaConfig, variant=st.sampled_from(VARIANTS), router=st.sampled_from(ROUTERS),
    **{field: st.integers(minimum, 1 << 20) for field, minimum in INT_FIELDS.items()})


@PROPERTY_SETTINGS
@given(config=VALID_CONFIGS, extra=st.dictionaries(st.sampled_from(["target", "report", "dump"]),
                                                    st.integers()))
def test_valid_configs_round_trip_through_options(config, extra):
    options = {**dataclasses.asdict(config), **extra}
    assert MisaConfig.from_options(options) == (config, extra)


def test_context_parallel_is_a_bool_off_by_default():
    assert MisaConfig().context_parallel is False
    assert MisaConfig(context_parallel=True).context_parallel is True
    assert MisaConfig.from_options({"context_parallel": True, "target": "aot_eager"}) == (
        MisaConfig(context_parallel=True), {"target": "aot_eager"})
    for value in (1, "yes", None):
        with _raises(TypeError, "MisaConfig.context_parallel must be a bool",
                     type(value).__name__):
            MisaConfig(context_parallel=value)
