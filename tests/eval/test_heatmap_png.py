"""The needle heatmap is a real PNG: the size its layout promises, every cell painted in the colour
of its value, and text (ticks, titles, legend) drawn around the cells."""
from __future__ import annotations

import math

import pytest

PIL = pytest.importorskip("PIL", reason="Pillow draws the heatmap PNG")
from PIL import Image  # noqa: E402

from misa_compile.eval.heatmap_png import (  # noqa: E402
    BACKGROUND, INK, HeatmapLayout, save_heatmap, value_color)

GRIDS = [("dense", [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]),
         ("MISA h=8", [[1.0, 0.0, 0.5], [float("nan"), 1.0, 0.25]])]


def draw(tmp_path):
    path = save_heatmap(tmp_path / "sub" / "heat.png", GRIDS, row_labels=["0%", "100%"],
                        col_labels=["1K", "2K", "4K"], title="Needle retrieval",
                        x_title="context length (keys)", y_title="needle depth")
    return path, Image.open(path)


def test_png_has_the_layout_size_and_cell_colours(tmp_path):
    path, image = draw(tmp_path)
    assert image.format == "PNG" and image.mode == "RGB"
    layout = HeatmapLayout(rows=2, cols=3, panels=2)
    assert image.size == layout.size
    for panel, (_, grid) in enumerate(GRIDS):
        for r, row in enumerate(grid):
            for c, value in enumerate(row):
                assert image.getpixel(layout.cell_center(panel, r, c)) == value_color(value)


def test_png_is_not_blank_and_has_text(tmp_path):
    _, image = draw(tmp_path)
    colours = image.getcolors(maxcolors=1 << 16)
    assert colours is not None and len(colours) > 10
    # Dark text pixels above the panels (titles) and left of the first panel (tick labels).
    layout = HeatmapLayout(rows=2, cols=3, panels=2)
    title_band = image.crop((0, 0, layout.size[0], layout.top))
    tick_band = image.crop((0, layout.top, layout.left, layout.top + layout.panel_h))
    for band in (title_band, tick_band):
        assert any(sum(colour) < 3 * 120 for _, colour in band.getcolors(1 << 16)), "no text"


def test_colour_scale_endpoints():
    assert value_color(0.0) == (215, 48, 39)
    assert value_color(1.0) == (26, 152, 80)
    assert value_color(math.nan) != value_color(0.0) and value_color(2.0) == value_color(1.0)
    assert BACKGROUND != INK


def test_ragged_grid_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is not a 2 x 3 grid"):
        save_heatmap(tmp_path / "x.png", [("bad", [[1.0, 1.0], [1.0]])], row_labels=["a", "b"],
                     col_labels=["1", "2", "3"], title="t", x_title="x", y_title="y")
