"""Where the bundles are, where medseg writes by default, and which code is running: the one place
that knows whether this is an installed package or a checkout.

The bundles ship inside the package as ``pipeline.bundles`` (in a checkout ``pipeline/bundles`` is a
symlink to the top-level ``bundles/``), so ``importlib.resources`` finds them in a wheel, in an
editable install and in a bare checkout alike. Each bundle's ``configs/`` holds, as relative
symlinks, the shared files of ``bundles/common/``: a workflow's ``--config_file`` list then lies
in one folder, which is what MONAI's ``ConfigWorkflow`` expects (it warns "Not all config files
are in ..." otherwise), and a bundle folder has every file its workflows need, as in the model zoo.
"""

from __future__ import annotations

import os
from importlib import metadata, resources
from pathlib import Path

DISTRIBUTION = "medseg-pipeline"
HOME_VARIABLE = "MEDSEG_HOME"  # where an installed medseg keeps its MLflow store (default: working dir)
# The checkout's root when running from one; site-packages for an installed wheel (never written to).
PROJECT_ROOT = Path(__file__).resolve().parents[1]

WORKFLOW_FILES: dict[str, tuple[str, ...]] = {
    "train": ("base.yaml", "train.yaml"),
    "multi_gpu_train": ("base.yaml", "train.yaml", "multi_gpu_train.yaml"),
    "inference": ("base.yaml", "inference.yaml"),
    "evaluate": ("base.yaml", "inference.yaml", "evaluate.yaml"),
}
MODEL_FILE = "configs/model.yaml"
# Bundles whose network is 2D whatever the data: they segment 2D images (the others follow the data's
# dimension, through the `spatial_dims` key a plan sets).
PLANAR_BUNDLES = ("unet2d",)
METADATA_FILE = "configs/metadata.json"
SHARED_METADATA_FILE = "configs/common_metadata.json"  # -> ../../common/metadata.json


def in_checkout() -> bool:
    """Running from the source tree (editable install or none), not from an installed wheel."""
    return (PROJECT_ROOT / "pyproject.toml").is_file() and (PROJECT_ROOT / "bundles").is_dir()


def bundles_root() -> Path:
    """The folder of the bundles, as the import system sees the package data."""
    root = resources.files("pipeline.bundles")
    if not isinstance(root, Path) or not root.is_dir():  # a zipped install: monai.bundle needs real files
        raise FileNotFoundError(f"the bundles of {DISTRIBUTION} are not files on disk ({root}); reinstall it")
    return root.resolve()  # a checkout's bundles/, not the pipeline/bundles link to it


BUNDLES_DIR = bundles_root()
COMMON_DIR = BUNDLES_DIR / "common"
LOGGING_FILE = COMMON_DIR / "logging.conf"
TRACKING_FILE = COMMON_DIR / "tracking.yaml"  # the full MLflow record (MONAI's --tracking settings)


def available_bundles() -> list[str]:
    return sorted(p.parent.parent.name for p in BUNDLES_DIR.glob(f"*/{MODEL_FILE}"))


def volume_bundles() -> list[str]:
    """The bundles that segment 3D volumes: all but ``PLANAR_BUNDLES``."""
    return [name for name in available_bundles() if name not in PLANAR_BUNDLES]


def bundle_dir(name: str) -> Path:
    folder = BUNDLES_DIR / name
    if not (folder / MODEL_FILE).is_file():
        raise ValueError(f"unknown bundle {name!r}; available: {', '.join(available_bundles())}")
    return folder


def config_files(name: str, workflow: str) -> list[str]:
    """Shared workflow files first, the bundle's model last, so the bundle's choices win; all in the
    bundle's ``configs/`` (the shared ones through their symlinks), so MONAI sees one config folder."""
    if workflow not in WORKFLOW_FILES:
        raise ValueError(f"unknown workflow {workflow!r}; one of {', '.join(WORKFLOW_FILES)}")
    configs = bundle_dir(name) / "configs"
    return [str(configs / f) for f in WORKFLOW_FILES[workflow]] + [str(bundle_dir(name) / MODEL_FILE)]


def meta_files(name: str) -> list[str]:
    """Metadata shared by all bundles, then the bundle's own (version, changelog, name, references)."""
    return [str(bundle_dir(name) / SHARED_METADATA_FILE), str(bundle_dir(name) / METADATA_FILE)]


def run_options(name: str, workflow: str, tracking: bool = True) -> dict[str, str]:
    """The location options of ``python -m monai.bundle run`` for a workflow, as ``medseg`` runs it."""
    configs = bundle_dir(name) / "configs"
    options = {
        "meta_file": list_value(meta_files(name)),
        "config_file": list_value(config_files(name, workflow)),
        "logging_file": str(configs / LOGGING_FILE.name),
        "bundle_root": str(bundle_dir(name)),
    }
    if tracking:
        options["tracking"] = str(configs / TRACKING_FILE.name)
    return options


def list_value(paths: list[str]) -> str:
    """A list as python-fire reads it back from one shell word (no spaces in the brackets)."""
    return "[" + ",".join(repr(p) for p in paths) + "]"


def home() -> Path:
    """Where medseg writes what has no place of its own (the MLflow store): ``MEDSEG_HOME`` if set, the
    checkout when running from one (what ``make mlflow-ui`` serves), else the working directory, so an
    installed package never writes into site-packages."""
    if os.environ.get(HOME_VARIABLE):
        return Path(os.environ[HOME_VARIABLE]).expanduser()
    return PROJECT_ROOT if in_checkout() else Path.cwd()


def installed_version() -> str:
    """The installed distribution's version, to name the code outside a checkout."""
    try:
        return f"{DISTRIBUTION}=={metadata.version(DISTRIBUTION)}"
    except metadata.PackageNotFoundError:
        return "unknown"
