"""Earlier home of the threshold baseline, now in three places (the same objects, re-exported):
the band search :mod:`ichseg.baselines.threshold`, the band as a network
:mod:`ichseg.models.intensity_band`, its Lightning fit :mod:`ichseg.lit.threshold` and the search
files :mod:`ichseg.lit.callbacks.threshold_report`. Importing this module imports Lightning;
:mod:`ichseg.models` does not import it.
"""

from ichseg.baselines.threshold import (
    LEVELS,
    LOWER_RANGE,
    OBJECTIVES,
    UPPER_RANGE,
    IntensityHistograms,
    Objective,
    ThresholdSearch,
    fit_thresholds,
    level_counts,
    naive_threshold_search,
    objective_surface,
    search_thresholds,
    store_histograms,
)
from ichseg.lit.callbacks.threshold_report import surface_image, write_search
from ichseg.lit.threshold import Source, ThresholdModule
from ichseg.models.intensity_band import BAND_LOGIT, IntensityBand

__all__ = [
    "BAND_LOGIT",
    "LEVELS",
    "LOWER_RANGE",
    "OBJECTIVES",
    "UPPER_RANGE",
    "IntensityBand",
    "IntensityHistograms",
    "Objective",
    "Source",
    "ThresholdModule",
    "ThresholdSearch",
    "fit_thresholds",
    "level_counts",
    "naive_threshold_search",
    "objective_surface",
    "search_thresholds",
    "store_histograms",
    "surface_image",
    "write_search",
]
