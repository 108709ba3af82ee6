"""The needle heatmap is a real PNG: the size its layout promises, every cell painted in the colour
of its value and labelled with it where the label fits, and text (ticks, titles, legend) drawn
around the cells."""
from __future__ import annotations

import math

import pytest

PIL = pytest.importorskip("PIL", reason="Pillow draws the heatmap PNG")
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from misa_compile.eval.heatmap_png import (  # noqa: E402
    BACKGROUND, GRID_LINE, INK, LIGHT_INK, HeatmapLayout, cell_text, draw_cell_label, label_ink,
    label_origin, save_heatmap, value_color)

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
                # Near the corner: the centre carries the cell's label.
                x0, y0, _, _ = layout.cell_box(panel, r, c)
                assert image.getpixel((x0 + 2, y0 + 2)) == value_color(value)


def colours(image) -> set:
    return {colour for _, colour in image.getcolors(maxcolors=1 << 16)}


def cell_alone(value: float, size: tuple[int, int], labelled: bool):
    """One cell drawn on its own, with or without its label, as render_heatmap draws it."""
    cell = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(cell)
    box = (0, 0, size[0] - 1, size[1] - 1)
    draw.rectangle(box, fill=value_color(value), outline=GRID_LINE)
    if labelled:
        assert draw_cell_label(draw, ImageFont.load_default(), box, value)
    return cell


def test_every_cell_carries_its_own_value(tmp_path):
    _, image = draw(tmp_path)
    layout = HeatmapLayout(rows=2, cols=3, panels=2)
    size = (layout.cell_w, layout.cell_h)
    for panel, (_, grid) in enumerate(GRIDS):
        for r, row in enumerate(grid):
            for c, value in enumerate(row):
                x0, y0, x1, y1 = layout.cell_box(panel, r, c)
                drawn = image.crop((x0, y0, x1 + 1, y1 + 1))
                assert drawn.tobytes() == cell_alone(value, size, True).tobytes()
                assert drawn.tobytes() != cell_alone(value, size, False).tobytes()
                # The text's strongest pixel is near the chosen ink, far from the fill.
                fill, ink = value_color(value), label_ink(value_color(value))
                inside = drawn.crop((1, 1, size[0] - 1, size[1] - 1))  # not the grid line
                strongest = max(colours(inside), key=lambda colour: math.dist(colour, fill))
                assert math.dist(strongest, ink) < math.dist(strongest, fill) / 4
    # 0.25 and 0.50 share a colour family but not a label: the text tells them apart.
    assert cell_alone(0.25, size, True).tobytes() != cell_alone(0.5, size, True).tobytes()


def test_label_goes_only_where_it_fits():
    box = (100, 40, 143, 61)                       # 44 x 22, the default cell
    assert label_origin((20, 8), box) == (112, 47)  # centred
    assert label_origin((40, 18), box) == (102, 42)  # exactly the room inside the margins
    assert label_origin((41, 8), box) is None
    assert label_origin((20, 19), box) is None
    small = Image.new("RGB", (12, 8), BACKGROUND)
    draw = ImageDraw.Draw(small)
    assert not draw_cell_label(draw, ImageFont.load_default(), (0, 0, 11, 7), 0.5)
    assert colours(small) == {BACKGROUND}


def test_label_text_and_contrast():
    assert [cell_text(v) for v in (0.0, 0.5, 1.0, math.nan)] == ["0.00", "0.50", "1.00", "n/a"]
    assert label_ink(value_color(0.0)) == LIGHT_INK     # white on the dark red end
    assert label_ink(value_color(0.5)) == INK           # dark on the yellow middle
    assert label_ink((0, 0, 0)) == LIGHT_INK and label_ink((255, 255, 255)) == INK


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
