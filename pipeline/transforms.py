"""The few transforms MONAI lacks as a single configurable step; everything else is MONAI's own."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from functools import partial
from typing import Any

import monai.transforms
import torch
from monai.data import MetaTensor
from monai.data.utils import to_affine_nd
from monai.transforms import MapTransform, NormalizeIntensityd, ScaleIntensityRanged
from monai.utils import TraceKeys

from pipeline.data.datalist import MASK_WHITE

CT_MODALITIES = ("CT",)


def normalise_intensity(
    keys: Sequence[str] | str,
    modality: str,
    ct_window: Sequence[float] = (-175.0, 250.0),
    allow_missing_keys: bool = False,
    ct_clip: Sequence | None = None,
    ct_mean: float | Sequence[float] | None = None,
    ct_std: float | Sequence[float] | None = None,
    zscore_nonzero: bool = True,
) -> MapTransform:
    """Intensity normalisation chosen by modality, as nnU-Net does.

    CT intensities are calibrated (HU), so fixed figures keep their meaning across scanners: with a
    plan (``ct_clip``, ``ct_mean``, ``ct_std``, from the training foreground, per channel or one for
    all) each channel is clipped and z-scored with them; without one, the fixed ``ct_window`` is
    clipped and scaled to [0, 1]. MRI intensities are arbitrary, so each volume is z-scored per
    channel, over its non-zero voxels when ``zscore_nonzero`` (the zero background stays zero).
    """
    if modality.upper() in CT_MODALITIES and ct_clip is not None:
        if ct_mean is None or ct_std is None:
            raise ValueError("ct_clip needs ct_mean and ct_std (the plan writes all three)")
        return ClipZScored(keys, ct_clip, ct_mean, ct_std, allow_missing_keys=allow_missing_keys)
    if modality.upper() in CT_MODALITIES:
        low, high = ct_window
        return ScaleIntensityRanged(
            keys,
            a_min=low,
            a_max=high,
            b_min=0.0,
            b_max=1.0,
            clip=True,
            allow_missing_keys=allow_missing_keys,
        )
    return NormalizeIntensityd(
        keys, nonzero=zscore_nonzero, channel_wise=True, allow_missing_keys=allow_missing_keys
    )


class ClipZScored(MapTransform):
    """Clip each channel to ``[low, high]``, then ``(x - mean) / std``: the training set's figures,
    the same at inference. Scalars apply to every channel; lists give one value (pair) per channel."""

    def __init__(
        self,
        keys: Sequence[str] | str,
        clip: Sequence,
        mean: float | Sequence[float],
        std: float | Sequence[float],
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        pairs = torch.as_tensor(clip, dtype=torch.float32).reshape(-1, 2)
        self.low, self.high = pairs[:, 0], pairs[:, 1]
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if bool((self.std <= 0).any()) or bool((self.low > self.high).any()):
            raise ValueError(f"CT normalisation needs std > 0 and low <= high, not clip {clip}, std {std}")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        result = dict(data)
        for key in self.key_iterator(result):
            image = result[key]
            channels = image.shape[0]
            if any(len(v) not in (1, channels) for v in (self.low, self.mean, self.std)):
                raise ValueError(
                    f"CT normalisation has figures for {len(self.mean)} channels, image has {channels}"
                )
            view = (-1,) + (1,) * (image.ndim - 1)
            low, high, mean, std = (
                v.to(image.device).view(view) for v in (self.low, self.high, self.mean, self.std)
            )
            values = torch.maximum(torch.minimum(torch.as_tensor(image, dtype=torch.float32), high), low)
            out = (values - mean) / std
            result[key] = (
                MetaTensor(out, meta=image.meta, applied_operations=image.applied_operations)
                if (isinstance(image, MetaTensor))
                else out
            )
        return result


def with_slice_axis(patch: Sequence[int], slice_axis: int | None) -> list[int]:
    """The crop of a volume for a 2D network's ``patch``: one voxel across ``slice_axis``, the patch
    in the slices' plane; the patch itself when the data's dimension is the network's."""
    patch = [int(size) for size in patch]
    if slice_axis is None:
        return patch
    if len(patch) != 2:
        raise ValueError(f"slice_axis {slice_axis} needs a 2D patch_size, not {patch}")
    return [*patch[:slice_axis], 1, *patch[slice_axis:]]


class LabelValuesd(MapTransform):
    """Label pixel values -> class indices: ``mapping`` (the datalist's ``label_values``) when given;
    without one, a two-class label stored as {0, 255} is read as {0, 1}, and any other label as it is.

    Why here and not in the reader: LoadImaged has one reader for image and label, and an image's
    255 is an intensity. Unmapped values of a ``mapping`` are an error naming the file, never
    background in silence.
    """

    def __init__(
        self,
        keys: Sequence[str] | str,
        mapping: Mapping[int | str, int] | None = None,
        num_classes: int = 2,
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mapping = {int(value): int(index) for value, index in (mapping or {}).items()}
        self.num_classes = num_classes

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.map(d[key])
        return d

    def map(self, label: torch.Tensor) -> torch.Tensor:
        values = {int(v) for v in torch.unique(torch.as_tensor(label))}
        if not self.mapping:
            binary = self.num_classes == 2 and MASK_WHITE in values and values <= {0, MASK_WHITE}
            return label / MASK_WHITE if binary else label
        unmapped = sorted(values - self.mapping.keys())
        if unmapped:
            source = getattr(label, "meta", {}).get("filename_or_obj", "a label")
            raise ValueError(
                f"{source} holds the values {unmapped[:10]}, which the datalist's label_values "
                f"{self.mapping} do not map to a class"
            )
        mapped = torch.zeros_like(torch.as_tensor(label))
        for value, index in self.mapping.items():
            mapped[label == value] = index
        return mapped


def is_nonzero(image: torch.Tensor) -> torch.Tensor:
    """Foreground for cropping: anything that is not background zero (MRI before or after its
    z-score, which keeps the zero background at zero)."""
    return image != 0


def is_above(image: torch.Tensor, threshold: float) -> torch.Tensor:
    return image > threshold


def foreground_selector(
    modality: str, ct_window: Sequence[float] = (-175.0, 250.0), ct_clip: Sequence | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """What ``CropForegroundd`` keeps, on the image before its normalisation: for CT the voxels above
    the floor the normalisation flattens everything below to (the plan's lower clip, else the
    window's), for anything else the non-zero voxels.

    Why before the normalisation: a z-score moves the flattened background off zero, so a crop after
    it would keep the whole volume. Without a plan this keeps exactly the old crop (window-scaled CT
    is non-zero where HU > window low; MRI's z-score keeps zeros at zero).
    """
    if modality.upper() not in CT_MODALITIES:
        return is_nonzero
    floor = (
        float(torch.as_tensor(ct_clip, dtype=torch.float32).reshape(-1, 2)[:, 0].min())
        if ct_clip
        else ct_window[0]
    )
    return partial(is_above, threshold=float(floor))


class Spacingd(monai.transforms.Spacingd):
    """MONAI's ``Spacingd``, whose inverse interpolates one axis at a time when it is linear (the
    probabilities' case); Spacing keeps the direction cosines, so it is always along the axes.

    Why: to bring a 512x512x300 CT's probabilities back, MONAI's inverse builds a grid of three
    coordinates per output voxel, 0.9 GB and 1.3 GB more while ``affine_grid`` makes it, and that
    was the peak of the whole inference; trilinear interpolation is three linear ones in a row, which
    need only the output and one channel's temporary. The result equals MONAI's to float rounding
    (``tests/test_transforms.py``); every other case (nearest, reflection) is MONAI's.
    """

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        result = dict(data)
        resampler = self.spacing_transform.sp_resample
        for key in self.key_iterator(result):
            image = result[key]
            plan = axis_aligned_plan(image, resampler.get_most_recent_transform(image))
            if plan is None:
                result[key] = self.spacing_transform.inverse(image)
                continue
            resampler.pop_transform(image)
            scale, offset, shape, padding, affine = plan
            values = resample_along_axes(image.as_tensor(), scale, offset, shape, padding)
            operations = image.applied_operations
            result[key] = MetaTensor(values, meta=dict(image.meta), applied_operations=operations)
            result[key].affine = affine
        return result


def axis_aligned_plan(image: Any, record: Mapping) -> tuple | None:
    """(scale, offset, output shape, padding, output affine) of an inverse that maps each output
    index j to the input index ``scale * j + offset`` per axis; ``None`` when it does not."""
    info = record[TraceKeys.EXTRA_INFO]
    linear = info["mode"] == "bilinear" and info["padding_mode"] in ("border", "zeros")
    volume = isinstance(image, MetaTensor) and image.ndim == 4  # (C, X, Y, Z)
    if not (volume and linear and info["align_corners"] in (False, TraceKeys.NONE)):
        return None
    source = to_affine_nd(3, image.affine).to(torch.float64).cpu()
    target = torch.as_tensor(info["src_affine"], dtype=torch.float64).cpu()
    xform = torch.linalg.solve(source, target)
    if not torch.allclose(xform[:3, :3], torch.diag(xform.diagonal()[:3]), atol=1e-6):
        return None
    shape = [int(n) for n in record[TraceKeys.ORIG_SIZE]]
    return xform.diagonal()[:3].tolist(), xform[:3, 3].tolist(), shape, info["padding_mode"], target


def resample_along_axes(
    values: torch.Tensor, scale: Sequence[float], offset: Sequence[float], shape: Sequence[int], padding: str
) -> torch.Tensor:
    """(C, X, Y, Z) values linearly interpolated at ``scale * j + offset`` on each axis, outside the
    input clamped to its border (``padding="border"``) or zero (``"zeros"``), as ``grid_sample``."""
    values = values.to(torch.float32)
    # the axes that shrink first, so the intermediate volumes stay small
    for axis in sorted(range(3), key=lambda a: shape[a] / values.shape[a + 1]):
        values = interpolate_axis(values, axis + 1, scale[axis], offset[axis], shape[axis], padding)
    return values


def interpolate_axis(
    values: torch.Tensor, dim: int, scale: float, offset: float, size: int, padding: str
) -> torch.Tensor:
    length = values.shape[dim]
    position = torch.arange(size, dtype=torch.float64, device=values.device) * scale + offset
    if padding == "border":
        position = position.clamp(0, length - 1)
    lower = position.floor()
    upper_weight = position - lower
    lower_weight = 1 - upper_weight
    lower = lower.long()
    upper = lower + 1
    if padding == "zeros":
        lower_weight[(lower < 0) | (lower >= length)] = 0
        upper_weight[(upper < 0) | (upper >= length)] = 0
    view = [size if d == dim - 1 else 1 for d in range(values.ndim - 1)]
    lower_weight = lower_weight.to(values.dtype).view(view)
    upper_weight = upper_weight.to(values.dtype).view(view)
    lower, upper = lower.clamp(0, length - 1), upper.clamp(0, length - 1)
    out = values.new_empty((*values.shape[:dim], size, *values.shape[dim + 1 :]))
    for channel in range(values.shape[0]):  # one channel's temporary at a time
        torch.index_select(values[channel], dim - 1, lower, out=out[channel])
        out[channel].mul_(lower_weight).addcmul_(values[channel].index_select(dim - 1, upper), upper_weight)
    return out
