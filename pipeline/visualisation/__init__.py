"""Pictures of segmentation results for people to look at."""

from pipeline.visualisation.overlay import save_overlay

__all__ = ["save_overlay"]
