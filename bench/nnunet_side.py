"""nnU-Net's side of the bench, run by nnU-Net's venv (``bench/nnunet.py`` starts it with the nnUNet_*
folders set): imports nnU-Net, torch and ``bench.sampling`` only (never MONAI, nor our pipeline).

``train``: a few iterations of fold 0, leaving ``checkpoint_final.pth`` where ``nnUNetv2_predict``
looks for it. nnU-Net changes its epoch length only through a trainer subclass found by name
(``nnUNetTrainer_Xepochs``), which would also rename the results folder and need ``-tr`` at
prediction; setting the plain trainer's attributes keeps the default ``nnUNetTrainer`` folder. Its
final full validation (``perform_actual_validation``, run by ``nnUNetv2_train`` after
``run_training``) is skipped: it segments every validation case and says nothing about speed.

``predict``: exactly what ::

    nnUNetv2_predict -i <folder with <case>_0000.nii.gz> -o <output_dir> -d NNN -c 3d_fullres -f 0 \\
        --disable_tta -device cpu

does (its defaults: step 0.5, Gaussian weighting, 3 preprocessing and 3 export processes, results on
the CPU), through the same ``nnUNetPredictor.predict_from_files`` call, with two differences:
the torch thread count is ours (the CLI takes every core) and ``predictor.network`` is wrapped in
``bench.sampling.SampledNetwork``: the first ``--sample-calls`` windows run for real, the rest are
answered by zeros, and the network's share of the wall time is extrapolated to every window, as
for our side. Both write ``<output_dir>/<case>.nii.gz``.

    python -m bench.nnunet_side train --dataset 500 --iterations 2 --threads 2
    python -m bench.nnunet_side predict --dataset 500 --image ct.nii.gz --output-dir out \\
        --sample-calls 1 --threads 2 --result result.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import SimpleITK as sitk
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.run.run_training import get_trainer_from_args
from nnunetv2.utilities.file_path_utilities import get_output_folder

from bench.sampling import SampledNetwork

CONFIGURATION = "3d_fullres"
CLI_PROCESSES = 3  # nnUNetv2_predict's -npp and -nps defaults


class SampledFoldNetwork(SampledNetwork):
    """nnU-Net loads each fold's weights into ``predictor.network`` before predicting a case: hand them
    to the wrapped network, whose parameter names they carry."""

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return self.network.load_state_dict(state_dict, strict=strict, assign=assign)


def train(dataset: int, iterations: int) -> None:
    """One epoch of ``iterations`` training iterations and one validation iteration, on the CPU."""
    trainer = get_trainer_from_args(str(dataset), CONFIGURATION, 0, device=torch.device("cpu"))
    trainer.num_epochs = 1
    trainer.num_iterations_per_epoch = iterations
    trainer.num_val_iterations_per_epoch = 1
    trainer.run_training()


def predictor_for(dataset: int) -> nnUNetPredictor:
    """The predictor ``nnUNetv2_predict -c 3d_fullres -f 0 --disable_tta -device cpu`` builds."""
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"),
                                allow_tqdm=False)  # fmt: skip
    folder = get_output_folder(dataset, "nnUNetTrainer", "nnUNetPlans", CONFIGURATION)
    predictor.initialize_from_trained_model_folder(
        folder, use_folds=(0,), checkpoint_name="checkpoint_final.pth"
    )
    return predictor


def input_folder(image: Path, folder: Path) -> Path:
    """The CLI's input: a folder of ``<case>_0000.nii.gz`` (channel 0), here a link to the image."""
    case = image.name.removesuffix(".gz").removesuffix(".nii")
    (folder / f"{case}_0000.nii.gz").symlink_to(image.resolve())
    return folder


def image_shape(image: Path) -> list[int]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(image))
    reader.ReadImageInformation()  # the header only
    return list(reader.GetSize())


def predict(dataset: int, image: Path, output_dir: Path, sample_calls: int) -> dict[str, Any]:
    """Segment ``image``; wall seconds with every window as if run, and the plan's facts."""
    predictor = predictor_for(dataset)
    sampled = SampledFoldNetwork(predictor.network, sample_calls)
    predictor.network = sampled
    with tempfile.TemporaryDirectory(prefix="nnunet-input-") as folder:
        inputs = input_folder(image, Path(folder))
        started = time.perf_counter()
        predictor.predict_from_files(str(inputs), str(output_dir), save_probabilities=False, overwrite=True,
                                     num_processes_preprocessing=CLI_PROCESSES,
                                     num_processes_segmentation_export=CLI_PROCESSES)  # fmt: skip
        wall = time.perf_counter() - started
    config = predictor.configuration_manager
    shape = image_shape(image)
    return {
        "seconds": sampled.total_seconds(wall),
        "wall_s": round(wall, 2),
        "outside_network_s": round(wall - sampled.network_seconds, 2),  # reading, workers, resampling, export
        "windows": sampled.windows,
        "seconds_per_window": sampled.seconds_per_window,
        "extrapolated": sampled.extrapolated,
        "patch_size": list(config.patch_size),  # nnU-Net's axis order: slices first
        "spacing": [round(float(value), 4) for value in config.spacing],
        "network": config.network_arch_class_name.rsplit(".", 1)[-1],
        "features_per_stage": config.network_arch_init_kwargs.get("features_per_stage"),
        "shape": shape,
        "voxels": shape[0] * shape[1] * shape[2],
        "threads": torch.get_num_threads(),
        "version": version("nnunetv2"),
        "torch": torch.__version__,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("train", "predict"):
        command = commands.add_parser(name)
        command.add_argument("--dataset", type=int, required=True)
        command.add_argument(
            "--threads", type=int, required=True, help="torch threads: ours, for a fair race"
        )
    commands.choices["train"].add_argument("--iterations", type=int, default=2)
    predicting = commands.choices["predict"]
    predicting.add_argument("--image", type=Path, required=True)
    predicting.add_argument("--output-dir", type=Path, required=True)
    predicting.add_argument("--sample-calls", type=int, default=1)
    predicting.add_argument("--result", type=Path, required=True)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.command == "train":
        train(args.dataset, args.iterations)
    else:
        result = predict(args.dataset, args.image, args.output_dir, args.sample_calls)
        args.result.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":  # nnU-Net's worker processes are spawned: they import this module anew
    main()
