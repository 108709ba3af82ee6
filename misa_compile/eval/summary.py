"""The short evaluation `make demo` prints: a reduced `misa eval --quick` (two lengths, one layer,
h in {4, 8, 16}, five needle depths), well under 20 s on two CPU cores."""
from __future__ import annotations

import dataclasses
import time
from typing import Optional

import torch

from .report import terminal_tables
from .runner import run_evaluation
from .settings import QUICK

DEMO = dataclasses.replace(QUICK, lengths=(2048, 4096), layers=1, active_heads=(4, 8, 16),
                           needle_lengths=(2048, 4096), needle_depths=(0.0, 0.25, 0.5, 0.75, 1.0),
                           repeats=0)


def demo_summary(device: Optional[torch.device | str] = None) -> dict:
    """Prints the short evaluation and returns its report document."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    start = time.perf_counter()
    report = run_evaluation(DEMO, device=device)
    print("Selection quality against the dense indexer (misa eval, short version)")
    print(terminal_tables(report))
    print(f"({time.perf_counter() - start:.1f} s; timings here include the first call. Full "
          "report with per-layer numbers and the needle heatmap PNG: "
          "misa eval --quick --out reports/eval)")
    return report
