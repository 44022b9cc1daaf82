"""Export a bundle as one self-contained folder in the MONAI model-zoo layout.

Here a workflow is composed at run time from ``bundles/common/`` and the bundle's ``model.yaml``;
a model-zoo user expects one merged config per workflow, run with plain ``python -m monai.bundle
run`` from the bundle's folder; ``pipeline.export_zoo`` adds what the model zoo checks for.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser
from monai.bundle.utils import merge_kv

from pipeline import export_zoo as zoo
from pipeline.bundle_parser import bundle_parser
from pipeline.data.datalist import save_dataset_info
from pipeline.io.checkpoint import (
    CheckpointError,
    dataset_facts,
    load_checkpoint,
    network_weights,
    save_atomic,
)
from pipeline.paths import (
    BUNDLES_DIR,
    COMMON_DIR,
    LOGGING_FILE,
    MODEL_FILE,
    PROJECT_ROOT,
    WORKFLOW_FILES,
    bundle_dir,
    config_files,
    meta_files,
)
from pipeline.workflows import require_fitting_checkpoint

# Workflows shipped as overrides on another workflow's config, as the model zoo ships multi-GPU training.
OVERLAYS = {"multi_gpu_train": "train"}
FIXED = {
    "meta_file": "configs/metadata.json",
    "logging_file": "configs/logging.conf",
    "bundle_root": ".",
    "ckpt_dir": "models",  # the docs' run folder; an export ships its weights in models/
}
OPTION = re.compile(
    r"""--(?P<option>config_file|meta_file|logging_file|bundle_root|ckpt_dir)(?P<sep>[ \t]+|=)"""
    r"""(?P<value>"[^"\n]*"|'[^'\n]*'|[^\s"'`]+)"""
)
CODE = re.compile(r"```.*?```|`[^`\n]+`", re.DOTALL)
# The docs' ``$(medseg config-files NAME WORKFLOW [--no-tracking])``: the installed bundle's files.
CONFIG_FILES = re.compile(r"\$\(medseg config-files [\w-]+ (?P<workflow>\w+)(?P<flags>(?: --[\w-]+)*)\)")
# A string that is an absolute path, or an expression passing a quoted absolute path as an argument.
ABSOLUTE = re.compile(r"""^(?:/|~/|[A-Za-z]:[\\/]|\\\\)|[(\[,=]\s*['"](?:/|~/|[A-Za-z]:[\\/])""")
# A path climbing out of the bundle folder (``../``), as a macro (``%../x.yaml::id``) or inside an expression.
PARENT = re.compile(r"(?:^|[^\w.])\.\.[/\\]")
NOTE = (
    "> Exported from medseg-pipeline (bundle `{name}`, version {version}). Inference and evaluation run "
    "with MONAI and the packages of `configs/metadata.json` (`required_packages_version`): the components "
    "they name are in `scripts/`. Training (`configs/train.json`) imports the `pipeline` package for its "
    "run tracking and resumption: `pip install medseg-pipeline` first. Run the commands below from this "
    "folder; the data paths in them are examples.\n"
)


def export_bundle(name: str, out_dir: str | Path, checkpoint: str | Path | None = None) -> Path:
    """Write the bundle to ``out_dir``, all or nothing: built beside it, then renamed into place."""
    target = Path(out_dir).absolute()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} exists and is not empty; export into a new or empty folder")
    bundle_dir(name)  # an unknown bundle fails here, before anything is written
    if checkpoint is not None:
        _require_state_dict(checkpoint)
    facts, trained = zoo.trained_facts(checkpoint)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.export-"))
    try:
        staging.chmod(0o755)  # mkdtemp's 0700 would make the bundle private to its writer
        metadata = _write_configs(name, staging / "configs")
        zoo.bake_trained_facts(staging / "configs", facts, trained)
        if checkpoint is not None:
            _copy_weights(Path(checkpoint), staging / "models")
        check_portable(staging / "configs", name)
        unscripted = zoo.finish(staging, metadata, facts)  # scripts/ and what the model zoo checks
        _write_docs(name, metadata["version"], staging / "docs", unscripted)
        if target.is_dir():
            target.rmdir()  # empty, checked above; rename will not replace a folder everywhere
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def export_onnx(name: str, checkpoint: str | Path, out: str | Path) -> Path:
    """``medseg export-onnx``: the bundle's network with ``checkpoint``'s weights (and the training
    config inside it) as one ONNX file whose metadata says what goes in and what comes out."""
    out = Path(out).absolute()
    if out.exists():
        raise FileExistsError(f"{out} exists; export to a new file")
    require_fitting_checkpoint(name, checkpoint, {})  # a missing or foreign checkpoint, in words
    parser = bundle_parser(name, "inference", {}, checkpoint=checkpoint)
    metadata = ConfigParser.load_config_files(meta_files(name))
    return zoo.deployable_onnx(parser, Path(checkpoint), out, metadata)


def _require_state_dict(checkpoint: str | Path) -> None:
    """Ship only a bare state dict, as the model zoo does; ``latest.pt`` also holds optimiser state."""
    state = load_checkpoint(checkpoint)  # CheckpointError naming the file when it cannot be read
    state = state if "trainer" in state else network_weights(state)  # model.pt: its network
    if not state or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(
            f"checkpoint {checkpoint} is not a state dict of tensors (a full training state?); "
            "export the best network, models/model.pt"
        )


def _write_configs(name: str, folder: Path) -> dict:
    """One merged JSON per workflow, overlays as overrides only; returns the merged metadata."""
    folder.mkdir(parents=True)
    for workflow in WORKFLOW_FILES:
        if workflow in OVERLAYS:
            config = _overlay_overrides(name, workflow)
        else:
            config = ConfigParser.load_config_files(config_files(name, workflow))
        (folder / f"{workflow}.json").write_text(json.dumps(config, indent=4) + "\n")
    metadata = ConfigParser.load_config_files(meta_files(name))
    (folder / "metadata.json").write_text(json.dumps(metadata, indent=4) + "\n")
    shutil.copyfile(LOGGING_FILE, folder / "logging.conf")
    return metadata


def _overlay_overrides(name: str, workflow: str) -> dict:
    """The overlay's own files, raw (``::`` ids kept, so they patch the base rather than replace it).

    The repository merges them before the bundle's model.yaml, a model-zoo user after the merged
    base config; refuse when that order would change the result.
    """
    base = OVERLAYS[workflow]
    extra = [f for f in WORKFLOW_FILES[workflow] if f not in WORKFLOW_FILES[base]]
    overrides: dict = {}
    for file in extra:
        for key, value in ConfigParser.load_config_file(COMMON_DIR / file).items():
            overrides.pop(key, None)  # re-insert: a later file's key is applied after the earlier ones
            overrides[key] = value
    check_no_clash(overrides, ConfigParser.load_config_file(bundle_dir(name) / MODEL_FILE), ", ".join(extra))
    exported = _merge([ConfigParser.load_config_files(config_files(name, base)), overrides])
    if exported != ConfigParser.load_config_files(config_files(name, workflow)):
        raise ValueError(f"bundle {name!r}: configs/{base}.json + {workflow}.json would not merge as {extra}")
    return overrides


def check_no_clash(overrides: Mapping, model: Mapping, source: str) -> None:
    """An id both set (or one nested in the other) is won by model.yaml here, by the overlay exported."""
    ids = [{key.lstrip("+").replace("#", "::") for key in config} for config in (overrides, model)]
    clashes = sorted(
        f"{a} / {b}"
        for a in ids[0]
        for b in ids[1]
        if a == b or a.startswith(b + "::") or b.startswith(a + "::")
    )
    if clashes:
        raise ValueError(f"model.yaml and {source} both set {', '.join(clashes)}; exported it would differ")


def _merge(configs: list[Mapping]) -> dict:
    """What ``--config_file`` with several files does, on dicts (copies: MONAI's ``+`` merges in place)."""
    parser = ConfigParser(config={})
    for config in copy.deepcopy(configs):
        for key, value in config.items():
            merge_kv(parser, key, value)
    return parser.get()


def _strings(value: Any) -> list[str]:
    """Every string of a JSON document, keys included."""
    if isinstance(value, dict):
        return [text for key, item in value.items() for text in (key, *_strings(item))]
    if isinstance(value, list):
        return [text for item in value for text in _strings(item)]
    return [value] if isinstance(value, str) else []


def _code(value: Any) -> set[str]:
    """What a config runs: its ``$`` expressions (imports included) and its ``_target_`` names."""
    if isinstance(value, dict):  # a model.yaml sets targets by id too: ``network_def::_target_: BasicUNet``
        targets = {item for key, item in value.items() if re.fullmatch(r"(.*(::|#))?_target_", key)}
        found = {item for item in targets if isinstance(item, str)}
        return found.union(*(_code(item) for item in value.values()))
    if isinstance(value, list):
        return set().union(*(_code(item) for item in value))
    return {value} if isinstance(value, str) and value.startswith("$") else set()


def shipped_code(bundle: str | None = None) -> set[str]:
    """The code of the repository's own config files: the shared ones and the bundle's (every bundle's
    when None). An export merges these files and writes nothing else, so it runs nothing else."""
    folders = [COMMON_DIR, *([bundle_dir(bundle) / "configs"] if bundle else BUNDLES_DIR.glob("*/configs"))]
    files = [
        path for folder in folders for path in sorted(folder.glob("*")) if path.suffix in {".yaml", ".json"}
    ]
    return set().union(*(_code(ConfigParser.load_config_file(path)) for path in files))


def check_portable(configs: Path, bundle: str | None = None) -> None:
    """The export must run on another machine without this repository, and run only what the project
    wrote: refuse any path leading back, and any expression or ``_target_`` that is not, verbatim, in
    the bundle's own config files. A deny-list of dangerous calls (``__import__``, ``os.system``, ...)
    would miss the next one (``torch.hub.load``, ``numpy.load``); an allow-list of the shipped code
    cannot be talked round by spelling."""
    allowed = shipped_code(bundle)
    for path in sorted(configs.glob("*.json")):
        config = json.loads(path.read_text())
        bad = [
            text
            for text in _strings(config)
            if str(PROJECT_ROOT) in text
            or re.search(r"bundles[/\\]common", text)
            or ABSOLUTE.search(text)
            or PARENT.search(text)
        ]
        if bad:
            raise ValueError(f"{path.name} refers outside the exported bundle: {', '.join(bad[:3])}")
        foreign = sorted(_code(config) - allowed)
        if foreign:
            raise ValueError(
                f"{path.name} runs code that is in none of the bundle's own configs: {', '.join(foreign[:3])}"
            )


def _replacements() -> dict[tuple[str, ...], str]:
    """File lists a docs command may give (as file names) -> the exported config(s) that replace them."""
    table = {}
    for workflow, files in WORKFLOW_FILES.items():
        exported = [f"configs/{w}.json" for w in (OVERLAYS.get(workflow), workflow) if w]
        value = exported[0] if len(exported) == 1 else '"' + str(exported).replace(" ", "") + '"'
        table[(*files, Path(MODEL_FILE).name)] = value
        table[tuple(Path(f).name for f in exported)] = value
    return table


def _listed_files(value: str) -> tuple[str, ...]:
    """The file names in a ``--config_file`` value: a quoted Python list, a comma list, or one path."""
    return tuple(Path(item).name for item in re.findall(r"[^\s\[\],'\"]+", value))


def rewrite_commands(text: str) -> str:
    """Point a README's commands at the exported files; an unknown file list fails, never ships stale."""
    table = _replacements()

    def replace(match: re.Match) -> str:
        option, value = match["option"], match["value"]
        if option != "config_file":
            return f"--{option}{match['sep']}{FIXED[option]}"
        files = _listed_files(value)
        if files not in table:
            raise ValueError(f"docs command gives --config_file {value}, which is no workflow's file list")
        return f"--{option}{match['sep']}{table[files]}"

    def expand(match: re.Match) -> str:
        return exported_options(match["workflow"], "--no-tracking" not in match["flags"])

    return CODE.sub(lambda code: OPTION.sub(replace, CONFIG_FILES.sub(expand, code[0])), text)


def exported_options(workflow: str, tracking: bool) -> str:
    """What ``medseg config-files`` prints, for the exported folder: its merged configs, run from it
    (MONAI's own MLflow record, as the export ships no tracking settings)."""
    if workflow not in WORKFLOW_FILES:
        raise ValueError(f"docs command asks for workflow {workflow!r}; one of {', '.join(WORKFLOW_FILES)}")
    config = _replacements()[(*WORKFLOW_FILES[workflow], Path(MODEL_FILE).name)]
    options = [f"--meta_file {FIXED['meta_file']}", f"--config_file {config}"]
    options += [f"--logging_file {FIXED['logging_file']}", f"--bundle_root {FIXED['bundle_root']}"]
    return " \\\n    ".join(options + (["--tracking mlflow"] if tracking else []))


def _write_docs(name: str, version: str, folder: Path, unscripted: str | None = None) -> None:
    """The bundle's README with its commands rewritten, and a note on what the export needs (and why
    it has no TorchScript weights, when it has none)."""
    text = rewrite_commands((bundle_dir(name) / "docs" / "README.md").read_text())
    text = text.replace("(from the repository root)", "(from this folder)")
    note = NOTE.format(name=name, version=version)
    if unscripted:
        note += f"> No `models/model.ts`: {unscripted}; use `models/model.pt`.\n"
    title, _, rest = text.partition("\n")
    text = f"{title}\n\n{note}\n{rest.lstrip()}" if title.startswith("# ") else f"{note}\n{text}"
    folder.mkdir(parents=True)
    (folder / "README.md").write_text(text)


def _copy_weights(checkpoint: Path, models: Path) -> None:
    """The weights, and the dataset facts inference reads beside them (labels, channels, modality)."""
    models.mkdir(parents=True)
    state = load_checkpoint(checkpoint)
    weights = zoo.inference_weights(network_weights(state))
    if weights.keys() == state.keys():  # a bare state dict of inference weights already: shipped as it is
        shutil.copyfile(checkpoint, models / "model.pt")
    else:  # the zoo expects the bare state dict of the inference network; the facts go beside it
        save_atomic(weights, models / "model.pt")
    try:
        save_dataset_info(dataset_facts(checkpoint), models)
    except CheckpointError:
        warnings.warn(
            f"no dataset facts in or beside {checkpoint}: the exported inference will need "
            "models/dataset.json",
            stacklevel=3,
        )
