"""The baseline: the MONAI model-zoo way (spleen_ct_segmentation) of running the same network.

Its preprocessing (no cropping to the body at inference), ``SlidingWindowInferer`` with 96^3
windows, ``sw_batch_size`` 4, overlap 0.5 and constant blending, float32; then Invertd, argmax
and SaveImaged. Training: ``CacheDataset`` + ``DataLoader`` with its foreground crop and random
pos/neg crops. Two things follow ours so the same weights fit: the voxel spacing and, for MRI,
z-scoring instead of the zoo's CT window (for CT the zoo's ScaleIntensityRanged is kept, with
our window).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.data import CacheDataset, DataLoader, Dataset, decollate_batch
from monai.inferers import SlidingWindowInferer
from monai.transforms import (
    Activationsd,
    AsDiscreted,
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    Invertd,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    SaveImaged,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from bench.sampling import SampledNetwork

WINDOW = (96, 96, 96)  # the zoo's; the same as every bundle's patch (a --quick run uses its own)
SW_BATCH_SIZE = 4
OVERLAP = 0.5
NUM_WORKERS = 4


def preprocessing(settings: dict, keys: Sequence[str]) -> list:
    modes = ["bilinear", "nearest"][: len(keys)]
    if settings["modality"].upper() == "CT":
        low, high = settings["ct_window"]
        intensity = ScaleIntensityRanged("image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
    else:
        intensity = NormalizeIntensityd("image", nonzero=True, channel_wise=True)
    return [
        LoadImaged(keys, image_only=True),
        EnsureChannelFirstd(keys),
        Orientationd(keys, axcodes="RAS"),
        Spacingd(keys, pixdim=settings["spacing"], mode=modes),
        intensity,
        EnsureTyped(keys),
    ]


def inference(
    network: torch.nn.Module,
    settings: dict,
    images: Sequence[str],
    output_dir: Path,
    sample_calls: int | None,
) -> tuple[float, SampledNetwork]:
    pre = Compose(preprocessing(settings, ["image"]))
    loader = DataLoader(
        Dataset([{"image": p} for p in images], pre), batch_size=1, num_workers=settings["num_workers"]
    )
    window = settings.get("patch_size", WINDOW)
    inferer = SlidingWindowInferer(window, SW_BATCH_SIZE, OVERLAP, mode="constant")
    post = Compose([
        Activationsd("pred", softmax=True),
        Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True),
        AsDiscreted("pred", argmax=True),
        SaveImaged("pred", output_dir=str(output_dir), output_postfix="seg", output_dtype="uint8",
                   resample=False, separate_folder=False, print_log=False),
    ])  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sampled = SampledNetwork(network.to(device).eval(), sample_calls)
    started = time.perf_counter()
    with torch.no_grad():
        for batch in loader:
            batch["pred"] = inferer(batch["image"].to(device), sampled).cpu()
            for item in decollate_batch(batch):
                post(item)
    return time.perf_counter() - started, sampled


def training_loader(settings: dict, cases: list[dict], batch_size: int, samples: int) -> DataLoader:
    """The zoo's training data: CacheDataset of the deterministic part, random pos/neg crops after."""
    keys, window = ["image", "label"], settings.get("patch_size", WINDOW)
    transforms = [
        *preprocessing(settings, keys),
        CropForegroundd(keys, source_key="image"),
        SpatialPadd(keys, window),  # a no-op on CT-sized volumes; --quick's tiny ones need it
        RandCropByPosNegLabeld(keys, "label", window, pos=1, neg=1, num_samples=samples),
    ]
    workers = settings["num_workers"]
    dataset = CacheDataset(cases, Compose(transforms), cache_rate=1.0, num_workers=workers)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers)
