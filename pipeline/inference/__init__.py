"""Inference outputs beyond MONAI's SaveImaged: a DICOM Segmentation for DICOM series inputs."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

from monai.transforms import MapTransform

from pipeline.inference import batch, runtimes, weights  # noqa: F401 - named by the bundle configs
from pipeline.io.dicom import is_series_path, split_series_path
from pipeline.io.dicom_seg import EmptySegmentationError, write_dicom_seg

logger = logging.getLogger(__name__)


class WriteDicomSegd(MapTransform):
    """After SaveImaged: when the input was a DICOM series, write ``<case>_seg.dcm`` beside the NIfTI.

    The SEG is built from the saved NIfTI (its affine places every source pixel), so it opens in a
    PACS viewer or 3D Slicer over the original images. NIfTI inputs pass through untouched.
    """

    def __init__(self, keys: Any, label_names: Mapping[int, str], image_key: str = "image") -> None:
        super().__init__(keys)
        self.label_names = label_names
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        result = dict(data)
        source = str(result[self.image_key].meta.get("filename_or_obj", ""))
        if not is_series_path(source):
            return result
        folder, series_uid = split_series_path(source)  # ``folder#uid``: the series in a shared folder
        for key in self.key_iterator(result):
            saved = Path(result[key].meta["saved_to"])
            target = batch.dicom_seg_path(saved)
            try:
                write_dicom_seg(saved, folder, target, self.label_names, series_uid=series_uid)
            except EmptySegmentationError:
                logger.warning("no structure found in %s: no DICOM SEG written (the NIfTI is)", saved.name)
        return result
