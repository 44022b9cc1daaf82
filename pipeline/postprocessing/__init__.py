"""Post-processing of the network's output, named by the bundle configs as ``pipeline.postprocessing.X``.

``crf`` refines the class probabilities (optional, before the argmax); ``labels`` takes the argmax
and cleans the label map per class (islands, largest component, holes).
"""

from pipeline.postprocessing.crf import CRFKernels, CRFRefined, mean_field
from pipeline.postprocessing.labels import (
    ArgMaxd,
    ClassSelection,
    DropBackgroundd,
    RemoveSmallComponents,
    RemoveSmallComponentsd,
    SizeLimits,
    channel_argmax,
    class_index,
    class_indices,
    size_limits,
    small_components,
    voxel_spacing,
)

__all__ = [
    "ArgMaxd",
    "CRFKernels",
    "CRFRefined",
    "ClassSelection",
    "DropBackgroundd",
    "RemoveSmallComponents",
    "RemoveSmallComponentsd",
    "SizeLimits",
    "channel_argmax",
    "class_index",
    "class_indices",
    "mean_field",
    "size_limits",
    "small_components",
    "voxel_spacing",
]
