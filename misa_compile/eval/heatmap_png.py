"""Heatmap images drawn with Pillow alone: one panel per variant, cells coloured from red (0) via
yellow to green (1) and labelled with their value where the text fits, tick labels, axis titles
and a colour legend in PIL's default font.

The geometry is fixed by the grid's size (HeatmapLayout), not by the text, so the image size is
known in advance and a cell's centre can be located in the saved file."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

RED, YELLOW, GREEN = (215, 48, 39), (254, 224, 139), (26, 152, 80)
MISSING = (190, 190, 190)
BACKGROUND, INK, GRID_LINE = (255, 255, 255), (30, 30, 30), (255, 255, 255)
LIGHT_INK = (255, 255, 255)   # cell labels on fills too dark for INK
LABEL_MARGIN = 2              # free pixels a cell label keeps from the cell's edges


def cell_text(value: float) -> str:
    """A cell's label: the value with two decimals, n/a for a missing (NaN) value."""
    return "n/a" if value is None or math.isnan(value) else f"{value:.2f}"


def label_ink(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    """INK or LIGHT_INK, whichever contrasts more with `fill` (WCAG contrast ratio), so a label
    stays readable on the dark red and green ends of the scale as on the yellow middle."""
    return max((INK, LIGHT_INK), key=lambda ink: _contrast(ink, fill))


def label_origin(text_size: tuple[int, int], box: tuple[int, int, int, int]):
    """Top-left corner that centres text of `text_size` (w, h) in the cell `box` (x0, y0, x1, y1
    inclusive), or None when the text and its margin do not fit: a clipped or crowded number
    is worse than none, and the colour still tells the value."""
    width, height = text_size
    x0, y0, x1, y1 = box
    room_w, room_h = x1 - x0 + 1 - 2 * LABEL_MARGIN, y1 - y0 + 1 - 2 * LABEL_MARGIN
    if width > room_w or height > room_h:
        return None
    return x0 + LABEL_MARGIN + (room_w - width) // 2, y0 + LABEL_MARGIN + (room_h - height) // 2


def draw_cell_label(draw, font, box: tuple[int, int, int, int], value: float) -> bool:
    """Writes `value` in the cell `box` when it fits; returns whether it did."""
    text = cell_text(value)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    origin = label_origin((right - left, bottom - top), box)
    if origin is None:
        return False
    draw.text((origin[0] - left, origin[1] - top), text, fill=label_ink(value_color(value)),
              font=font)
    return True


def value_color(value: float) -> tuple[int, int, int]:
    """Red at 0, yellow at 0.5, green at 1; grey for NaN."""
    if value is None or math.isnan(value):
        return MISSING
    value = min(max(value, 0.0), 1.0)
    low, high, t = (RED, YELLOW, value * 2) if value < 0.5 else (YELLOW, GREEN, value * 2 - 1)
    return tuple(round(a + (b - a) * t) for a, b in zip(low, high))


@dataclass(frozen=True)
class HeatmapLayout:
    rows: int
    cols: int
    panels: int
    cell_w: int = 44
    cell_h: int = 22
    left: int = 78        # y-axis title and tick labels
    top: int = 52         # image title and panel titles
    bottom: int = 48      # x tick labels and x-axis title
    gap: int = 24         # between panels
    legend: int = 86      # colour bar and its labels, right of the last panel

    @property
    def panel_w(self) -> int:
        return self.cols * self.cell_w

    @property
    def panel_h(self) -> int:
        return self.rows * self.cell_h

    @property
    def size(self) -> tuple[int, int]:
        width = self.left + self.panels * self.panel_w + (self.panels - 1) * self.gap + self.legend
        return width, self.top + self.panel_h + self.bottom

    def panel_origin(self, panel: int) -> tuple[int, int]:
        return self.left + panel * (self.panel_w + self.gap), self.top

    def cell_box(self, panel: int, row: int, col: int) -> tuple[int, int, int, int]:
        x0, y0 = self.panel_origin(panel)
        x, y = x0 + col * self.cell_w, y0 + row * self.cell_h
        return x, y, x + self.cell_w - 1, y + self.cell_h - 1

    def cell_center(self, panel: int, row: int, col: int) -> tuple[int, int]:
        x0, y0, x1, y1 = self.cell_box(panel, row, col)
        return (x0 + x1) // 2, (y0 + y1) // 2


def render_heatmap(panels: Sequence[tuple[str, Sequence[Sequence[float]]]],
                   row_labels: Sequence[str], col_labels: Sequence[str], *, title: str,
                   x_title: str, y_title: str):
    """panels: (panel title, grid[row][col] of values in [0, 1]). Returns a PIL RGB image."""
    from PIL import Image, ImageDraw, ImageFont

    if not panels:
        raise ValueError("render_heatmap: no panels to draw")
    rows, cols = len(row_labels), len(col_labels)
    for name, grid in panels:
        if len(grid) != rows or any(len(line) != cols for line in grid):
            raise ValueError(f"render_heatmap: panel {name!r} is not a {rows} x {cols} grid")
    layout = HeatmapLayout(rows=rows, cols=cols, panels=len(panels))
    image = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    _text(draw, (layout.size[0] // 2, 6), title, font, anchor="ma")
    for index, (name, grid) in enumerate(panels):
        x0, y0 = layout.panel_origin(index)
        _text(draw, (x0 + layout.panel_w // 2, y0 - 18), name, font, anchor="ma")
        for r in range(rows):
            for c in range(cols):
                box = layout.cell_box(index, r, c)
                draw.rectangle(box, fill=value_color(grid[r][c]), outline=GRID_LINE)
                draw_cell_label(draw, font, box, grid[r][c])
        for c, label in enumerate(col_labels):
            cx = x0 + c * layout.cell_w + layout.cell_w // 2
            _text(draw, (cx, y0 + layout.panel_h + 4), label, font, anchor="ma")
        if index == 0:
            for r, label in enumerate(row_labels):
                cy = y0 + r * layout.cell_h + layout.cell_h // 2
                _text(draw, (x0 - 5, cy), label, font, anchor="rm")
    plot_right = layout.panel_origin(len(panels) - 1)[0] + layout.panel_w
    _text(draw, ((layout.left + plot_right) // 2, layout.size[1] - 16), x_title, font, anchor="ma")
    _vertical_text(image, (12, layout.top + layout.panel_h // 2), y_title, font)
    _legend(draw, layout, plot_right, font)
    return image


def save_heatmap(path: str | Path, *args, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    render_heatmap(*args, **kwargs).save(path, format="PNG")
    return path


def _legend(draw, layout: HeatmapLayout, plot_right: int, font) -> None:
    x0 = plot_right + 22
    y0, height = layout.top, layout.panel_h
    for y in range(height):
        draw.line([(x0, y0 + y), (x0 + 14, y0 + y)], fill=value_color(1 - y / max(height - 1, 1)))
    draw.rectangle((x0, y0, x0 + 14, y0 + height - 1), outline=INK)
    _text(draw, (x0 + 20, y0), "1 found", font, anchor="lt")
    _text(draw, (x0 + 20, y0 + height - 1), "0 missed", font, anchor="lb")


def _contrast(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    lighter, darker = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (lighter + 0.05) / (darker + 0.05)


def _luminance(rgb: tuple[int, int, int]) -> float:
    """WCAG relative luminance of an sRGB colour."""
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4
              for c in (channel / 255 for channel in rgb)]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def _text(draw, xy, text: str, font, anchor: str) -> None:
    try:
        draw.text(xy, text, fill=INK, font=font, anchor=anchor)
    except ValueError:
        # Bitmap fonts (Pillow without FreeType) do not take anchors: centre by measuring.
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        x, y = xy
        horizontal, vertical = anchor[0], anchor[1]
        x -= {"l": 0, "m": (right - left) // 2, "r": right - left}[horizontal]
        y -= {"a": 0, "t": 0, "m": (bottom - top) // 2, "b": bottom - top}[vertical]
        draw.text((x, y), text, fill=INK, font=font)


def _vertical_text(image, center: tuple[int, int], text: str, font) -> None:
    from PIL import Image, ImageDraw

    probe = ImageDraw.Draw(image)
    left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
    strip = Image.new("RGB", (right - left + 4, bottom - top + 4), BACKGROUND)
    ImageDraw.Draw(strip).text((2 - left, 2 - top), text, fill=INK, font=font)
    strip = strip.rotate(90, expand=True)
    x, y = center
    image.paste(strip, (x - strip.width // 2, y - strip.height // 2))
