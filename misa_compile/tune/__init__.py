"""`misa tune`: per indexer site, the cheapest MISA setting whose selection keeps a recall target
of the dense indexer's, measured on the user's own captured tensors (docs/tune.md)."""
from .cost import CostModel, MeasuredTimes, relative_flops
from .search import SiteResult, TuneResult, TuneSettings, tune_sites
from .sites import TuneSite, capture_model_sites, sites_from_capture

__all__ = ["CostModel", "MeasuredTimes", "relative_flops", "SiteResult", "TuneResult", "TuneSettings",
           "tune_sites", "TuneSite", "capture_model_sites", "sites_from_capture"]
