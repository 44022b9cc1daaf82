"""Default sample dataset: grey/white-matter segmentation cut from the MNI152 2009 template.

Why this data: it is real 1 mm T1 MRI with real tissue labels, and the only route to it that
the pipeline can rely on is PyPI — nilearn's wheel ships the ICBM 2009a *symmetric* T1 and its
grey-/white-matter probability maps.  We download the wheel with pip and unzip three files;
nilearn itself is never installed or imported (it would pull scikit-learn, pandas, ...).

How one template becomes a dataset (why blocks, why the gap, why not halves):

* The template is exactly left–right symmetric, so a left half and a right half are the same
  image mirrored.  With flip augmentation, training on one half and validating on the other
  would validate on training data.  So a case is never a hemisphere: every case spans the full
  left–right extent of the head.
* Instead the head's bounding box is cut into ``GRID`` = 5 superior–inferior rows × 2
  anterior–posterior columns.  Different blocks hold genuinely different anatomy (cerebellum,
  basal ganglia, vertex, frontal vs. occipital lobe).
* ``GAP_MM`` (6 mm) of tissue between neighbouring blocks is thrown away, so no two cases
  share a boundary slice and a network cannot score by recognising its training neighbour's
  edge; the template is smooth, so a gap of a few mm is what decorrelates the borders.
* Blocks with less than ``MIN_BRAIN_FRACTION`` brain (label > 0) are dropped; in the real
  template that removes the inferior-anterior block (orbits, ~1.5 % brain), leaving 9 cases.
* Test split: one block from the second S–I row (posterior column) and one from the
  second-to-last row (anterior column).  They are in different rows, and neither is an
  extreme row, so the held-out cases are representative rather than mostly background.  The
  rest are training cases with ``fold = index % 4`` in name order (deterministic).

Each case is saved at native 1 mm with the template affine shifted to the block's origin, so it
sits at its true place in MNI space.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

NILEARN_VERSION = "0.14.1"
WHEEL_NAME = f"nilearn-{NILEARN_VERSION}-py3-none-any.whl"
WHEEL_MEMBER = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
TEMPLATE_KEYS = ("t1", "gm", "wm")

GRID = (5, 2)  # (superior–inferior rows, anterior–posterior columns)
GAP_MM = 6  # in voxels, i.e. mm at the template's 1 mm spacing
HEAD_THRESHOLD = 0.05  # fraction of the T1 maximum that counts as head
MIN_BRAIN_FRACTION = 0.05
N_FOLDS = 4
DATALIST_NAME = "datalist.json"

REFERENCE = (
    "VS Fonov, AC Evans, K Botteron, CR Almli, RC McKinstry, DL Collins and BDCG. Unbiased average "
    "age-appropriate atlases for pediatric studies. NeuroImage 54(1):313-327, 2011. "
    "doi:10.1016/j.neuroimage.2010.07.033. Template: ICBM 2009a nonlinear symmetric, as shipped in "
    f"nilearn {NILEARN_VERSION}."
)
LICENCE = (
    "Copyright (C) 1993-2004 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological "
    "Institute, McGill University. Permission to use, copy, modify, and distribute this software and "
    "its documentation for any purpose and without fee is hereby granted, provided that the above "
    "copyright notice appear in all copies. The authors and McGill University make no representations "
    "about the suitability of this software for any purpose. It is provided 'as is' without express or "
    "implied warranty."
)


@dataclass(frozen=True)
class Block:
    """One case: its grid position and its voxel window in the (RAS-canonical) template."""

    si: int
    ap: int
    window: tuple[slice, slice, slice]

    @property
    def name(self) -> str:
        """Stable across runs because it comes from the grid position, not the build order."""
        return f"mni_si{self.si}_ap{self.ap}"


def fetch_template(cache_dir: Path) -> dict[str, Path]:
    """Download the pinned nilearn wheel with pip (PyPI is the only reachable source) and unzip
    the T1, GM and WM maps next to it.  Both steps are skipped when already done."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheel = cache_dir / WHEEL_NAME
    if not wheel.is_file():
        _pip_download(cache_dir)
    paths = {}
    for key in TEMPLATE_KEYS:
        member = WHEEL_MEMBER.format(key)
        paths[key] = cache_dir / Path(member).name
        if not paths[key].is_file():
            _extract_member(wheel, member, paths[key])
    return paths


def _pip_download(cache_dir: Path) -> None:
    """pip, not urllib, because pip already knows the index, proxies and certificates in use."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"nilearn=={NILEARN_VERSION}"]
    proc = subprocess.run([*cmd, "-d", str(cache_dir)], capture_output=True, text=True)
    if proc.returncode != 0 or not (cache_dir / WHEEL_NAME).is_file():
        raise RuntimeError(
            f"`pip download nilearn=={NILEARN_VERSION}` failed, so the MNI template could not be fetched; "
            f"PyPI must be reachable (or put {WHEEL_NAME} into {cache_dir}).\n{proc.stderr[-2000:]}"
        )


def _extract_member(wheel: Path, member: str, target: Path) -> None:
    """Extract via a temporary name so an interrupted run never leaves a truncated NIfTI."""
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(f"{target}.part", "wb") as dst:
            shutil.copyfileobj(src, dst)
    except (zipfile.BadZipFile, KeyError) as err:
        raise RuntimeError(f"{wheel} is damaged or lacks {member}; delete it and retry") from err
    os.replace(f"{target}.part", target)


def tissue_labels(gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """Hard labels 0/1/2 from probabilities; background is what GM and WM leave over."""
    background = np.clip(1.0 - gm - wm, 0.0, 1.0)
    return np.argmax(np.stack([background, gm, wm]), axis=0).astype(np.uint8)


def _load(path: Path, probability: bool = False) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Load in RAS order so axis 0 is L–R, 1 is A–P, 2 is S–I whatever the file's storage order.

    nilearn's 'converted' probability maps are uint8 with 255 meaning 1.0, hence the rescale."""
    img = nib.as_closest_canonical(nib.load(str(path)))
    data = img.get_fdata(dtype=np.float32)
    if probability and data.max() > 1.0:
        data /= 255.0
    return img, data


def _cuts(lo: int, hi: int, n: int, gap: int) -> list[slice]:
    """Split [lo, hi) into n windows separated by `gap` voxels that belong to no window."""
    usable = hi - lo - (n - 1) * gap
    if usable < n:
        raise ValueError(f"extent {hi - lo} too small for {n} blocks with {gap}-voxel gaps")
    sizes = [usable // n + (k < usable % n) for k in range(n)]
    starts = [lo + sum(sizes[:k]) + k * gap for k in range(n)]
    return [slice(s, s + size) for s, size in zip(starts, sizes, strict=True)]


def plan_blocks(
    t1: np.ndarray, labels: np.ndarray, grid: tuple[int, int] = GRID, gap: int = GAP_MM
) -> list[Block]:
    """Cut the head's bounding box into S–I × A–P blocks, each spanning the full L–R extent."""
    head = np.argwhere(t1 > HEAD_THRESHOLD * t1.max())
    lo, hi = head.min(axis=0), head.max(axis=0) + 1
    lr = slice(int(lo[0]), int(hi[0]))
    blocks = []
    for si, si_cut in enumerate(_cuts(int(lo[2]), int(hi[2]), grid[0], gap)):
        for ap, ap_cut in enumerate(_cuts(int(lo[1]), int(hi[1]), grid[1], gap)):
            window = (lr, ap_cut, si_cut)
            if (labels[window] > 0).mean() >= MIN_BRAIN_FRACTION:
                blocks.append(Block(si, ap, window))
    return blocks


def pick_test(blocks: list[Block]) -> list[Block]:
    """Two held-out blocks from different, non-extreme S–I rows (see module docstring)."""
    rows = sorted({b.si for b in blocks})
    if len(rows) < 2:
        raise ValueError("need blocks in at least two S–I rows to hold out two test cases")
    first = [b for b in blocks if b.si == rows[len(rows) // 4]]
    last = [b for b in blocks if b.si == rows[(3 * len(rows)) // 4]]
    return [min(first, key=lambda b: b.ap), max(last, key=lambda b: b.ap)]


def _save(data: np.ndarray, like: nib.Nifti1Image, dtype: type, path: Path) -> None:
    """Write with `like`'s header and shifted affine, forcing dtype (the template's is uint8)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data.astype(dtype), like.affine, like.header)
    img.set_data_dtype(dtype)
    nib.save(img, str(path))


def _write_case(
    block: Block, t1_img: nib.Nifti1Image, t1: np.ndarray, labels: np.ndarray, out_dir: Path, split: str
) -> dict:
    """Save one block; `img.slicer` shifts the affine's origin to the block's first voxel."""
    like = t1_img.slicer[block.window]
    entry = {"image": f"images{split}/{block.name}.nii.gz", "label": f"labels{split}/{block.name}.nii.gz"}
    _save(t1[block.window], like, np.float32, out_dir / entry["image"])
    _save(labels[block.window], like, np.uint8, out_dir / entry["label"])
    return entry


def build_dataset(
    t1: Path, gm: Path, wm: Path, out_dir: Path, *, grid: tuple[int, int] = GRID, gap: int = GAP_MM
) -> Path:
    """Turn the template into MSD-style cases and a datalist; returns the datalist path."""
    out_dir = Path(out_dir)
    t1_img, t1_data = _load(t1)
    gm_img, gm_data = _load(gm, probability=True)
    wm_img, wm_data = _load(wm, probability=True)
    for img in (gm_img, wm_img):
        if img.shape != t1_img.shape or not np.allclose(img.affine, t1_img.affine):
            raise ValueError("T1, GM and WM maps must share shape and affine")
    labels = tissue_labels(gm_data, wm_data)
    blocks = plan_blocks(t1_data, labels, grid, gap)
    test = pick_test(blocks)
    training = [b for b in sorted(blocks, key=lambda b: b.name) if b not in test]
    train_entries = [
        {**_write_case(b, t1_img, t1_data, labels, out_dir, "Tr"), "fold": i % N_FOLDS}
        for i, b in enumerate(training)
    ]
    test_entries = [_write_case(b, t1_img, t1_data, labels, out_dir, "Ts") for b in test]
    return _write_datalist(out_dir, train_entries, test_entries)


def _write_datalist(out_dir: Path, training: list[dict], test: list[dict]) -> Path:
    """Written last and atomically, so a valid datalist implies every case is on disk."""
    datalist = {
        "name": "MNI152-2009-brain-tissue",
        "description": "Grey/white-matter labels of the ICBM 2009a symmetric T1 template, cut into "
        f"S-I x A-P blocks (full L-R extent, {GAP_MM} mm gaps discarded) at native 1 mm in MNI space.",
        "reference": REFERENCE,
        "licence": LICENCE,
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "grey_matter", "2": "white_matter"},
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
    }
    path = out_dir / DATALIST_NAME
    path.with_suffix(".part").write_text(json.dumps(datalist, indent=2))
    os.replace(path.with_suffix(".part"), path)
    return path


def datalist_is_valid(path: Path) -> bool:
    """True when the datalist parses and every file it names exists (the idempotency check)."""
    try:
        datalist = json.loads(Path(path).read_text())
        train, test = datalist["training"], datalist["test"]
        files = [Path(path).parent / e[k] for e in train + test for k in ("image", "label")]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return bool(train) and bool(test) and all(f.is_file() for f in files)


def prepare(out_dir: Path, cache_dir: Path) -> Path:
    """Fetch the template and build the dataset unless a valid datalist is already there."""
    datalist = Path(out_dir) / DATALIST_NAME
    if datalist_is_valid(datalist):
        return datalist
    paths = fetch_template(cache_dir)
    return build_dataset(paths["t1"], paths["gm"], paths["wm"], out_dir)
