"""tune.png: recall of the dense selection against the active heads h, one line per site, on the
tuning queries; the chosen setting of each site ringed, the target a dashed line. Drawn with
Pillow alone (as the evaluation's heatmap), h on a log2 axis."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from misa_compile.config import site_layer_index
from misa_compile.eval.heatmap_png import BACKGROUND, INK, _text

# Distinct line colours, cycled when there are more sites.
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
WIDTH, HEIGHT = 760, 420
LEFT, RIGHT, TOP, BOTTOM = 60, 230, 30, 50


def save_tune_plot(path: str | Path, sites: Sequence, target: float, metric: str) -> Path:
    """`sites`: SiteResults of misa_compile.tune.search."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (WIDTH, HEIGHT), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    max_heads = max(site.heads for site in sites)
    floor = min([target] + [p.tune_recall for s in sites for p in s.points
                            if not math.isnan(p.tune_recall)])
    low = max(0.0, math.floor(floor * 10) / 10)
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, TOP, HEIGHT - BOTTOM

    def x_of(h: float) -> float:
        span = math.log2(max_heads) or 1.0
        return x0 + (x1 - x0) * math.log2(h) / span

    def y_of(recall: float) -> float:
        return y1 - (y1 - y0) * (recall - low) / ((1.0 - low) or 1.0)

    draw.rectangle((x0, y0, x1, y1), outline=INK)
    for exponent in range(int(math.log2(max_heads)) + 1):
        x = x_of(2 ** exponent)
        draw.line([(x, y1), (x, y1 + 4)], fill=INK)
        _text(draw, (x, y1 + 6), str(2 ** exponent), font, anchor="mt")
    steps = 5
    for i in range(steps + 1):
        value = low + (1.0 - low) * i / steps
        draw.line([(x0 - 4, y_of(value)), (x0, y_of(value))], fill=INK)
        _text(draw, (x0 - 6, y_of(value)), f"{value:.2f}", font, anchor="rm")
    _text(draw, ((x0 + x1) / 2, HEIGHT - 14), "active heads h (MISA)", font, anchor="mm")
    _text(draw, (x0, 12), f"recall of dense ({metric}, tuning queries); ring (square: MISA-hier): chosen", font,
          anchor="lm")
    for x in range(int(x0), int(x1), 8):
        draw.line([(x, y_of(target)), (x + 4, y_of(target))], fill=INK)
    for index, site in enumerate(sites):
        color = PALETTE[index % len(PALETTE)]
        points = [p for p in site.points if p.variant == "misa" and not math.isnan(p.tune_recall)]
        xy = [(x_of(p.active_heads), y_of(p.tune_recall)) for p in points]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        for x, y in xy:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=color)
        chosen = site.chosen
        if chosen.variant != "dense" and not math.isnan(chosen.tune_recall):
            x, y = x_of(chosen.active_heads), y_of(chosen.tune_recall)
            # A ring on the MISA line; a square, off the line, for a MISA-hier choice.
            shape = draw.ellipse if chosen.variant == "misa" else draw.rectangle
            shape((x - 6, y - 6, x + 6, y + 6), outline=color, width=2)
        legend_y = y0 + 14 * index
        draw.line([(x1 + 12, legend_y), (x1 + 28, legend_y)], fill=color, width=2)
        _text(draw, (x1 + 32, legend_y), f"{_short(site.name)}: {chosen.label}", font,
              anchor="lm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


def _short(name: str, width: int = 14) -> str:
    """"layer 3" for a site in a layer stack, else the name's end."""
    layer = site_layer_index(name)
    if layer is not None:
        return f"layer {layer}" + ("" if name.endswith(":topk") else f" {name.rsplit(':', 1)[-1]}")
    return name if len(name) <= width else "…" + name[-(width - 1):]
