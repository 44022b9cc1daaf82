"""Pictures of segmentation results for people to look at: overlays of one case, montages of many."""

from pipeline.visualisation.montage import MontageCase, save_montage
from pipeline.visualisation.overlay import overlay_figure, save_overlay, save_overlay_arrays

__all__ = ["MontageCase", "overlay_figure", "save_montage", "save_overlay", "save_overlay_arrays"]
