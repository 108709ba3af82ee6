"""Selection-quality evaluation: seeded workloads with the structure of real indexers, capture of
a real model's indexer inputs, recall / IoU against the dense selection, needle heatmaps and the
`misa eval` report. See docs/eval.md."""
from .capture import CapturedSite, capture_indexer_sites, load_sites, save_sites
from .metrics import selection_iou, selection_quality
from .summary import demo_summary
from .workloads import (NeedleSpec, Structure, Workload, isotropic_workload, make_workload,
                        structured_workload)

__all__ = ["CapturedSite", "NeedleSpec", "Structure", "Workload", "capture_indexer_sites",
           "demo_summary", "isotropic_workload", "load_sites", "make_workload", "save_sites",
           "selection_iou", "selection_quality", "structured_workload"]
