"""What makes an exported bundle one the MONAI model zoo accepts (its ``ci/verify_bundle.py``):
``LICENSE``, ``large_files.yml``, metadata valid against ``meta_schema_20240725.json`` and describing
the trained model, configs that build the network from the bundle folder alone, TorchScript weights
(and ONNX, ``models/model.onnx``, with its input and output described in its metadata), and the
components inference and evaluation name copied into ``scripts/``, so neither needs this
package installed. Training (``configs/train.json``) still imports the ``pipeline`` package: its
handlers record to MLflow and resume runs, which is this project's application, not the model's.
"""

from __future__ import annotations

import ast
import copy
import json
import re
import sys
from collections.abc import Mapping
from importlib import metadata as distributions
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
import yaml
from monai.bundle import ConfigParser
from monai.data import save_net_with_metadata

from pipeline.inference.runtimes import write_onnx
from pipeline.io.checkpoint import (
    dataset_facts,
    file_digest,
    load_checkpoint,
    load_network_weights,
    saved_config,
)
from pipeline.paths import DISTRIBUTION

SCHEMA = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)
PORTABLE = ("inference", "evaluate")  # the workflows that run from scripts/, without this package
TRAINED = ("train", "inference", "evaluate")  # merged workflows built with the checkpoint's config
PACKAGE = "pipeline"
SCRIPTS = "scripts"  # the model zoo's folder for a bundle's own code, imported as ``scripts.xxx``
PACKAGE_ROOT = Path(__file__).resolve().parent
# ``pipeline`` as a module name: dotted (``$pipeline.x``, ``pipeline.io.readers.Reader``) or imported.
MODULE_NAME = re.compile(r"(?<![\w.\-])pipeline(?=\.\w)|(?<=import )pipeline\b|(?<=from )pipeline(?= import)")
DOTTED_NAME = re.compile(r"pipeline(?:\.\w+)+")
# pipeline/paths.py finds the bundles as package data when imported; an export is one bundle, in its own
# folder, so scripts/ gets an empty ``bundles`` package for that look-up to succeed.
EMPTY_PACKAGES = ("bundles",)
# The default dataset's header (pipeline/data/mni_brain.py), which the shared metadata describes: the
# facts of an export without weights.
DEFAULT_FACTS = {
    "name": "MNI152-2009-brain-tissue",
    "modality": {"0": "MRI"},
    "labels": {"0": "background", "1": "grey_matter", "2": "white_matter"},
}
LICENSE_TEXT = """{copyright}

Licensed under the Apache License, Version 2.0 (the "License"); you may not use the files of this
bundle except in compliance with the License. You may obtain a copy of the License at

    http://www.apache.org/licenses/LICENSE-2.0

Unless required by applicable law or agreed to in writing, software distributed under the License is
distributed on an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or
implied. See the License for the specific language governing permissions and limitations under the
License. {intended_use}.
"""
# Not in optional_packages_version: MONAI reads that key as a deprecated required_packages_version.
TRAINING_NEEDS = (
    f"Training (configs/train.json) also needs {DISTRIBUTION}=={{}}; inference and evaluation do not."
)
NO_WEIGHTS = (
    "# Exported without weights: train with configs/train.json, publish models/model.pt and put its\n"
    "# download address and md5 here (the model zoo keeps weights out of git and downloads them).\n"
)
WITH_WEIGHTS = "# The weights are in models/; the model zoo keeps them out of git: publish them, set url.\n"
# Keys that only shape training, set as inference needs them in the exported inference and evaluation:
# DynUNet's deep-supervision heads add training losses, and TorchScript (the zoo's ckpt_export) rejects
# their code. Evaluation-mode output is the same without them.
TRAINING_ONLY = {"deep_supervision": False}
# The heads' weights, and the skip layers' references to them, which a network without heads lacks.
TRAINING_ONLY_WEIGHTS = ("deep_supervision_heads.", "super_head.")


def trained_facts(checkpoint: str | Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The dataset facts and training config keys the weights were trained with (the default dataset's
    facts and no keys without weights), checked to be plain values a config cannot mistake for code."""
    if checkpoint is None:
        return copy.deepcopy(DEFAULT_FACTS), {}
    facts = dataset_facts(checkpoint)
    code = [text for text in _strings(facts) if text.startswith(("$", "@", "%"))]
    if code:
        raise ValueError(f"dataset facts of {checkpoint} hold {code[0]!r}, which a bundle config would run")
    return facts, saved_config(load_checkpoint(checkpoint))


def bake_trained_facts(configs: Path, facts: Mapping[str, Any], keys: Mapping[str, Any]) -> None:
    """Build the exported workflows as the weights were trained, from the config files alone: the
    training's config keys (patch size, features, plan) on each merged workflow, and the dataset facts
    inline where inference would read them from ``models/``."""
    for workflow in TRAINED:
        path = configs / f"{workflow}.json"
        parser = ConfigParser(json.loads(path.read_text()))
        for key, value in keys.items():
            parser[key] = copy.deepcopy(value)  # ``network_def::filters`` ids set the nested key
        if workflow in PORTABLE:
            parser["dataset_info"] = dict(facts)
            parser.update({key: value for key, value in TRAINING_ONLY.items() if key in parser})
        path.write_text(json.dumps(parser.get(), indent=4) + "\n")


def finish(bundle: Path, metadata: Mapping[str, Any], facts: Mapping[str, Any]) -> str | None:
    """Everything past the merged configs: scripts/, the zoo's metadata, LICENSE, TorchScript and
    large_files.yml; returns why there is no model.ts beside a model.pt (None when there is)."""
    inference = json.loads((bundle / "configs" / "inference.json").read_text())  # still naming pipeline.
    packages = ship_scripts(bundle)
    described = zoo_metadata(metadata, facts, patch_size(inference), packages)
    (bundle / "configs" / "metadata.json").write_text(json.dumps(described, indent=4) + "\n")
    write_license(bundle, described)
    unscripted = None
    if (bundle / "models" / "model.pt").is_file():
        unscripted = write_torchscript(bundle, inference, described)
        parser = ConfigParser(copy.deepcopy(dict(inference)))
        parser["bundle_root"] = str(bundle)
        deployable_onnx(parser, bundle / "models" / "model.pt", bundle / "models" / "model.onnx", described)
    write_large_files(bundle)
    return unscripted


def inference_weights(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights the exported inference network holds: all but those of training-only parts."""
    return {k: v for k, v in state.items() if not any(part in k for part in TRAINING_ONLY_WEIGHTS)}


def write_torchscript(bundle: Path, config: Mapping[str, Any], metadata: Mapping[str, Any]) -> str | None:
    """``models/model.ts`` as the zoo's ``ckpt_export`` writes it (metadata and inference config
    inside); None when written, else why the network cannot be scripted. ``config`` names the
    installed package, which this process has, rather than scripts/, which it does not import."""
    parser = ConfigParser(copy.deepcopy(dict(config)))
    parser["bundle_root"] = str(bundle)
    network = load_network_weights(parser.get_parsed_content("network_def"), bundle / "models" / "model.pt")
    try:
        scripted = torch.jit.script(network.eval())
    except Exception as error:  # TorchScript rejects many Python constructs, each with its own type
        return f"{type(network).__name__} cannot be scripted ({type(error).__name__}: {_first_line(error)})"
    extra = {"inference.json": json.dumps(to_scripts(config)).encode()}
    save_net_with_metadata(
        scripted, str(bundle / "models" / "model.ts"), include_config_vals=False,
        meta_values=dict(metadata), more_extra_files=extra,
    )  # fmt: skip
    return None


def deployable_onnx(
    parser: ConfigParser, checkpoint: Path, out: Path, metadata: Mapping[str, Any] | None = None
) -> Path:
    """``out``: the inference config's network with ``checkpoint``'s weights as ONNX, for windows of the
    config's patch, with what a deployment must do around it (orientation, spacing, intensities,
    sliding window, labels) in its metadata."""
    network = load_network_weights(parser.get_parsed_content("network_def"), checkpoint).eval()
    patch = [int(size) for size in parser.get_parsed_content("patch_size")]
    window = (int(parser.get_parsed_content("in_channels")), *patch)
    write_onnx(network, window, out, onnx_description(parser, metadata or {}))
    return out


def onnx_description(parser: ConfigParser, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The preprocessing and the window pass the network was trained for, as plain values."""
    keys = ("spacing", "modality", "labels", "ct_window", "ct_clip", "ct_mean", "ct_std", "zscore_nonzero",
            "sw_overlap", "sw_blending", "patch_size", "slice_axis")  # fmt: skip
    values = {key: parser.get_parsed_content(key) for key in keys}
    intensity = ("ct_window", "ct_clip", "ct_mean", "ct_std", "zscore_nonzero")
    return {
        "bundle": parser.get_parsed_content("bundle_name"),
        "version": metadata.get("version", ""),
        "preprocessing": {
            "orientation": "RAS", "spacing_mm": values["spacing"], "channels": values["modality"],
            "intensity": {key: values[key] for key in intensity},
            "note": "CT: clipped to ct_clip and z-scored with ct_mean/ct_std when set, else ct_window scaled "
                    "to [0, 1]; other modalities: z-score over the non-zero voxels when zscore_nonzero",
        },
        "sliding_window": {"roi_size": values["patch_size"], "overlap": values["sw_overlap"],
                           "blending": values["sw_blending"], "slice_axis": values["slice_axis"]},
        "labels": {str(index): name for index, name in values["labels"].items()},
    }  # fmt: skip


def ship_scripts(bundle: Path) -> dict[str, str]:
    """Copy the modules the portable workflows name, with their in-project imports, into
    ``scripts/`` and point those configs at them; returns the packages they import (name -> version)."""
    configs = [bundle / "configs" / f"{workflow}.json" for workflow in PORTABLE]
    names = set().union(*(DOTTED_NAME.findall(path.read_text()) for path in configs))
    modules = module_closure(names)
    for source in modules.values():
        target = bundle / SCRIPTS / source.relative_to(PACKAGE_ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(MODULE_NAME.sub(SCRIPTS, source.read_text()))
    for package in EMPTY_PACKAGES:
        (bundle / SCRIPTS / package).mkdir(parents=True, exist_ok=True)
        (bundle / SCRIPTS / package / "__init__.py").write_text(
            '"""Empty: this bundle is its own folder."""\n'
        )
    for path in configs:
        path.write_text(json.dumps(to_scripts(json.loads(path.read_text())), indent=4) + "\n")
    return required_packages(modules.values())


def to_scripts(value: Any) -> Any:
    """A config with its code (``$`` expressions, dotted class names) naming ``scripts.`` for
    ``pipeline.``; data strings (labels, names) stay as they are."""
    if isinstance(value, dict):
        return {key: to_scripts(item) for key, item in value.items()}
    if isinstance(value, list):
        return [to_scripts(item) for item in value]
    if isinstance(value, str) and (value.startswith("$") or DOTTED_NAME.fullmatch(value)):
        return MODULE_NAME.sub(SCRIPTS, value)
    return value


def module_closure(names: set[str]) -> dict[str, Path]:
    """The project modules behind dotted names, their parent packages and everything they import from
    the project (imports inside functions too: they run when the function does)."""
    found: dict[str, Path] = {}
    todo = [module for name in names if (module := _module(name))]
    while todo:
        module, path = todo.pop()
        if module in found:
            continue
        found[module] = path
        parents = [".".join(module.split(".")[:n]) for n in range(1, module.count(".") + 1)]
        imported = [name for name in _imports(path, module) if name.split(".")[0] == PACKAGE]
        todo += [entry for name in parents + imported if (entry := _module(name))]
    return found


def _module(name: str) -> tuple[str, Path] | None:
    """The longest prefix of a dotted name that is a project module, and its file."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        folder = PACKAGE_ROOT.joinpath(*parts[1:end])
        for path in (folder / "__init__.py", folder.with_suffix(".py")):
            if parts[0] == PACKAGE and path.is_file():
                return ".".join(parts[:end]), path
    return None


def _imports(path: Path, module: str) -> set[str]:
    """Every module a source file imports (``from a import b`` gives ``a`` and ``a.b``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def required_packages(sources: Any) -> dict[str, str]:
    """The distributions the shipped modules import, with their installed versions (MONAI, PyTorch and
    NumPy have keys of their own in the metadata)."""
    imported = {name.split(".")[0] for path in sources for name in _imports(path, PACKAGE)}
    providers = distributions.packages_distributions()
    own = {"monai", "torch", "numpy", PACKAGE, *sys.stdlib_module_names}
    packages = {_distribution(name, providers[name]) for name in imported - own if name in providers}
    packages.add("pytorch-ignite")  # MONAI's engines, which every workflow runs on
    return {dist: distributions.version(dist) for dist in sorted(packages, key=str.lower)}


def _distribution(module: str, candidates: list[str]) -> str:
    """The distribution that installs an import name: the one named after it when several do
    (``mlflow`` is in mlflow, mlflow-skinny and mlflow-tracing)."""
    named = [
        dist for dist in candidates if dist.lower().replace("_", "-") == module.lower().replace("_", "-")
    ]
    return (named or sorted(candidates))[0]


def zoo_metadata(
    metadata: Mapping[str, Any], facts: Mapping[str, Any], patch_size: list[int], packages: Mapping[str, str]
) -> dict[str, Any]:
    """The bundle's metadata under the zoo's current schema, describing the model's own dataset: its
    channels and modality in, one channel per label out, on the patch the network is run on."""
    labels = {
        str(index): str(name) for index, name in sorted(facts["labels"].items(), key=lambda i: int(i[0]))
    }
    channels = {str(index): str(name) for index, name in facts.get("modality", {"0": "MRI"}).items()}
    first = next(iter(channels.values()))
    modality = "CT" if first.upper() == "CT" else "MR" if first.upper() in {"MR", "MRI"} else first
    # supported_apps: an object in the zoo's bundles, an array in MONAI's copy of the schema; none here.
    dropped = {"supported_apps", "required_packages_version", "optional_packages_version"}
    out = {key: value for key, value in metadata.items() if key not in dropped}
    out.update(
        schema=SCHEMA,
        monai_version=monai.__version__.split("+")[0],
        pytorch_version=torch.__version__.split("+")[0],
        numpy_version=np.__version__,
        required_packages_version=dict(packages),
        description=f"{metadata.get('description', '')} {TRAINING_NEEDS.format(_own_version())}".strip(),
        task=f"{len(patch_size)}D segmentation of {', '.join(list(labels.values())[1:])} in {modality} "
        + ("volumes" if len(patch_size) == 3 else "images"),
        data_source=f"dataset {facts.get('name', 'unnamed')}",
        image_classes=f"{len(channels)} channel(s): {', '.join(channels.values())}",
        label_classes=", ".join(f"{index} {name}" for index, name in labels.items()),
        pred_classes=f"{len(labels)} channels, softmax per class: " + ", ".join(labels.values()),
    )
    tensor = {"type": "image", "spatial_shape": list(patch_size), "dtype": "float32", "is_patch_data": True}
    out["network_data_format"] = {
        "inputs": {
            "image": {
                **tensor,
                "format": "hounsfield" if modality == "CT" else "magnitude",
                "modality": modality,
                "num_channels": len(channels),
                "value_range": [],
                "channel_def": channels,
            }
        },
        "outputs": {
            "pred": {
                **tensor,
                "format": "segmentation",
                "num_channels": len(labels),
                "value_range": [0, 1],
                "channel_def": labels,
            }
        },
    }
    return out


def patch_size(config: Mapping[str, Any]) -> list[int]:
    """The sliding-window patch of the exported inference, the input shape the network is checked on."""
    return [int(size) for size in ConfigParser(copy.deepcopy(dict(config))).get_parsed_content("patch_size")]


def write_license(bundle: Path, metadata: Mapping[str, Any]) -> None:
    """The project's licence (pyproject.toml: Apache-2.0) under the bundle's copyright; the zoo wants one."""
    text = LICENSE_TEXT.format(copyright=metadata["copyright"], intended_use=metadata.get("intended_use", ""))
    (bundle / "LICENSE").write_text(text.rstrip(". \n") + ".\n")


def write_large_files(bundle: Path) -> None:
    """``large_files.yml``: each weight file with its md5, or a placeholder saying where weights come from."""
    models = bundle / "models"
    files = [models / name for name in ("model.pt", "model.ts", "model.onnx") if (models / name).is_file()]
    entries = [
        {"path": f"models/{f.name}", "url": "", "hash_val": file_digest(f, "md5"), "hash_type": "md5"}
        for f in files
    ]
    header = WITH_WEIGHTS if files else NO_WEIGHTS
    entries = entries or [{"path": "models/model.pt", "url": "", "hash_val": "", "hash_type": "md5"}]
    (bundle / "large_files.yml").write_text(
        header + yaml.safe_dump({"large_files": entries}, sort_keys=False)
    )


def _own_version() -> str:
    try:
        return distributions.version(DISTRIBUTION)
    except distributions.PackageNotFoundError:  # a checkout never installed
        return "unknown"


def _strings(value: Any) -> list[str]:
    if isinstance(value, Mapping):
        return [text for key, item in value.items() for text in (str(key), *_strings(item))]
    if isinstance(value, list):
        return [text for item in value for text in _strings(item)]
    return [value] if isinstance(value, str) else []


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else "no detail"
