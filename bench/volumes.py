"""CT-sized test volumes written to disk: a body-shaped ellipse of soft tissue in air, with organs.

Real CT-sized volumes are not in ``../shared/data`` (its CTs are small), so the bench writes its
own at the sizes and spacing of an abdominal CT. Labels: 1 a liver-like organ, 2 a kidney-like one.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

CT_SPACING = (0.8, 0.8, 2.5)
LABELS = {"0": "background", "1": "liver", "2": "kidney"}


def ellipsoid(grid: list[np.ndarray], centre: tuple[float, ...], radii: tuple[float, ...]) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) < 1.0


def scaled(fractions: tuple[float, ...], shape: tuple[int, ...]) -> tuple[float, ...]:
    return tuple(f * n for f, n in zip(fractions, shape, strict=True))


def ct_volume(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """HU image (int16) and label (uint8); the body spans ~70 % of the field of view, as in a real CT."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    grid = np.ogrid[:nx, :ny, :nz]
    grid = [g.astype(np.float32) for g in grid]
    body = ellipsoid(grid[:2], (nx / 2, ny / 2), (0.36 * nx, 0.27 * ny))
    image = np.full(shape, -1000, np.int16)
    image[np.broadcast_to(body, shape)] = 40
    label = np.zeros(shape, np.uint8)
    organs = [  # (label, centre and radii as fractions of the shape, HU)
        (1, (0.40, 0.45, 0.5), (0.14, 0.12, 0.30), 60),
        (2, (0.62, 0.58, 0.45), (0.05, 0.06, 0.15), 150),
    ]
    for value, centre, radii, hu in organs:
        mask = ellipsoid(grid, scaled(centre, shape), scaled(radii, shape))
        label[mask] = value
        image[mask] = hu
    image = image + rng.normal(0, 15, size=shape).astype(np.int16)
    return image, label


def write_case(folder: Path, name: str, shape: tuple[int, int, int], seed: int = 0) -> dict:
    """Write ``<name>.nii.gz`` and ``<name>_label.nii.gz`` once; later calls reuse the files."""
    folder.mkdir(parents=True, exist_ok=True)
    image_path, label_path = folder / f"{name}.nii.gz", folder / f"{name}_label.nii.gz"
    if not (image_path.is_file() and label_path.is_file()):
        image, label = ct_volume(shape, seed)
        affine = np.diag([*CT_SPACING, 1.0])
        nib.save(nib.Nifti1Image(label, affine), label_path)
        nib.save(nib.Nifti1Image(image, affine), image_path)
    return {"image": str(image_path), "label": str(label_path)}


def write_datalist(folder: Path, shape: tuple[int, int, int], num_cases: int) -> Path:
    """A CT datalist (the project's format) of ``num_cases`` training cases, folds alternating."""
    size = "x".join(map(str, shape))
    cases = [write_case(folder, f"train_{size}_{i}", shape, seed=i + 1) for i in range(num_cases)]
    entries = [{**case, "fold": index % 2} for index, case in enumerate(cases)]
    datalist = {"name": "bench-ct", "modality": {"0": "CT"}, "labels": LABELS, "training": entries}
    path = folder / f"datalist_{size}_{num_cases}.json"
    path.write_text(json.dumps(datalist, indent=2))
    return path
