"""The fingerprint through MONAI's DataAnalyzer on real shared data: plans, cache and channels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.planning import rules
from pipeline.planning.fingerprint import fingerprint
from pipeline.planning.plan import make_plan

CPU = rules.Device("cpu", 16 * 2**30, 2)


def by_voxels(patch: tuple[int, ...], batch: int, _: dict) -> int:
    """Memory as a real step scales (activations linear in voxels); no network needed."""
    return int(np.prod(patch)) * batch * 2000


def write_datalist(path: Path, cases: list[dict], modality: dict, labels: dict) -> Path:
    path.write_text(json.dumps({"name": "t", "modality": modality, "labels": labels, "training": cases}))
    return path


def hippocampus(shared: Path, count: int) -> list[dict]:
    root = shared / "msd_hippocampus"
    training = json.loads((root / "dataset.json").read_text())["training"][:count]
    return [{"image": str(root / c["image"]), "label": str(root / c["label"])} for c in training]


HIPPO_MODALITY, HIPPO_LABELS = {"0": "MRI"}, {"0": "background", "1": "Anterior", "2": "Posterior"}


def test_hippocampus_plans_near_40x56x40_whatever_the_order(shared_data: Path, tmp_path: Path) -> None:
    cases = hippocampus(shared_data, 10)
    forward = write_datalist(tmp_path / "forward.json", cases, HIPPO_MODALITY, HIPPO_LABELS)
    backward = write_datalist(tmp_path / "backward.json", cases[::-1], HIPPO_MODALITY, HIPPO_LABELS)
    fp = fingerprint(forward)
    assert len(fp.read) == 10 and (tmp_path / "forward.fingerprint.json").is_file()
    plan = make_plan(fp, "resunet", CPU, step_bytes=by_voxels)
    assert plan.spacing == (1.0, 1.0, 1.0)
    assert all(abs(p - q) <= 8 for p, q in zip(plan.patch_size, (40, 56, 40), strict=True)), plan.patch_size
    fixed = make_plan(fp, "multiresunet", CPU, step_bytes=by_voxels).patch_size  # four 2x poolings
    assert all(p % 16 == 0 and 32 <= p <= 64 for p in fixed), fixed
    again = fingerprint(backward)
    assert again == fp
    assert make_plan(again, "resunet", CPU, step_bytes=by_voxels).to_yaml() == plan.to_yaml()
    cached = fingerprint(forward)
    assert cached.read == () and cached == fp


def test_a_changed_file_is_the_only_case_read_again(shared_data: Path, tmp_path: Path) -> None:
    cases = []
    for case in hippocampus(shared_data, 3):
        copy = {}
        for key in ("image", "label"):
            target = tmp_path / key / Path(case[key]).name
            target.parent.mkdir(exist_ok=True)
            shutil.copyfile(case[key], target)
            copy[key] = f"{key}/{target.name}"
        cases.append(copy)
    datalist = write_datalist(tmp_path / "dataset.json", cases, HIPPO_MODALITY, HIPPO_LABELS)
    first = fingerprint(datalist)
    assert len(first.read) == 3
    changed = tmp_path / cases[1]["image"]
    image = nib.load(changed)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj, dtype=np.float32) * 2, image.affine), changed)
    second = fingerprint(datalist)
    assert second.read == ("image/" + Path(cases[1]["image"]).name,)
    before = {c.name: c for c in first.cases}
    after = {c.name: c for c in second.cases}
    assert after["image/" + Path(cases[1]["image"]).name].foreground[0].mean == pytest.approx(
        2 * before["image/" + Path(cases[1]["image"]).name].foreground[0].mean, rel=1e-4
    )
    assert fingerprint(datalist).read == ()


def test_two_channel_brats_gets_per_channel_normalisation(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "brats2015_sample" / "train"
    case = sorted(folder.iterdir())[0]
    entry = {
        "image": [str(case / "Flair_subtrMeanDivStd.nii.gz"), str(case / "T1c_subtrMeanDivStd.nii.gz")],
        "label": str(case / "OTMultiClass.nii.gz"),
    }
    labels = {"0": "background", "1": "necrosis", "2": "oedema", "3": "non-enhancing", "4": "enhancing"}
    datalist = write_datalist(tmp_path / "brats.json", [entry], {"0": "FLAIR", "1": "T1c"}, labels)
    fp = fingerprint(datalist)
    (stats,) = fp.cases
    assert len(stats.foreground) == 2 and stats.foreground[0].mean != stats.foreground[1].mean
    norms = rules.normalisation(fp)
    assert [n.scheme for n in norms] == ["zscore", "zscore"]
    assert [n.reason.split(":")[0] for n in norms] == ["FLAIR", "T1c"]
    assert all(n.nonzero for n in norms)  # skull-stripped: zero background


def test_an_anisotropic_ct_follows_the_out_of_plane_rule(shared_data: Path, tmp_path: Path) -> None:
    """The shared CT and its labels with the header of a 0.8x0.8x5 mm scan (and one at 0.7x0.7x4)."""
    source = shared_data / "totalsegmentator_example"
    ct, seg = nib.load(source / "example_ct_sm.nii.gz"), nib.load(source / "example_seg.nii.gz")
    cases = []
    for index, spacing in enumerate([(0.8, 0.8, 5.0), (0.7, 0.7, 4.0)]):
        affine = np.diag([*spacing, 1.0])
        for key, data in (("image", np.asarray(ct.dataobj)), ("label", (np.asarray(seg.dataobj) > 0))):
            nib.save(nib.Nifti1Image(data.astype(np.int16 if key == "image" else np.uint8), affine),
                     tmp_path / f"{key}_{index}.nii.gz")  # fmt: skip
        cases.append({"image": f"image_{index}.nii.gz", "label": f"label_{index}.nii.gz"})
    datalist = write_datalist(tmp_path / "ct.json", cases, {"0": "CT"}, {"0": "background", "1": "body"})
    fp = fingerprint(datalist)
    plan = make_plan(fp, "resunet", CPU, step_bytes=by_voxels)
    assert plan.spacing[:2] == (0.75, 0.75)
    assert plan.spacing[2] == pytest.approx(np.percentile([5.0, 4.0], 10))
    assert plan.recommend_2d
    assert plan.network["strides"][0] == [2, 2, 1]  # in-plane first: the coarse axis waits
    assert plan.network["strides"][-1][2] in (1, 2)
    z_poolings = sum(s[2] == 2 for s in plan.network["strides"])
    assert z_poolings < sum(s[0] == 2 for s in plan.network["strides"])
    low, high = plan.ct_clip
    assert low < plan.ct_mean < high and plan.ct_std > 0
