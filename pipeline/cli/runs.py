"""``medseg train``, ``infer``, ``evaluate`` and ``compare``: the commands that run a bundle's network."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli.options import OVERRIDES_EPILOG, add_tracking_options, parse_overrides, run_overrides
from pipeline.compare import DEFAULT_BUNDLES, compare
from pipeline.evaluation import REPORT_FILE, evaluate_predictions, read_summary
from pipeline.evaluation.report import summary_lines
from pipeline.workflows import evaluate, infer, infer_ensemble, train


def default_checkpoint(bundle: str) -> Path:
    return Path("outputs") / bundle / "models" / "model.pt"


def ensemble_members(text: str) -> list[tuple[str, Path]]:
    """``bundle[=checkpoint],...`` (a bare name means that bundle's default checkpoint)."""
    members = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, checkpoint = item.partition("=")
        members.append((name, Path(checkpoint) if checkpoint else default_checkpoint(name)))
    return members


def _train(args: argparse.Namespace) -> None:
    models = train(
        args.bundle,
        args.data,
        str(Path("outputs") / args.bundle) if args.output is None else args.output,
        args.epochs,
        run_overrides(args),
        nproc=args.nproc,
        check_data=not args.skip_check,
        plan=not args.no_plan,
        minutes=args.minutes,
    )
    print(f"checkpoints: {models}")


def _infer(args: argparse.Namespace) -> None:
    checkpoint = args.checkpoint or default_checkpoint(args.bundle)
    overrides = run_overrides(args)
    if args.dicom_seg:
        overrides["dicom_seg"] = True
    options = {"overwrite": args.overwrite, "nproc": args.nproc}
    if args.ensemble:
        members = [(args.bundle, Path(checkpoint)), *ensemble_members(args.ensemble)]
        names, checkpoints = [name for name, _ in members], [path for _, path in members]
        out = infer_ensemble(names, checkpoints, args.input, args.output, overrides, **options)
    else:
        out = infer(args.bundle, args.input, args.output, checkpoint, overrides, **options)
    print(f"segmentations: {out}")


def _evaluate(args: argparse.Namespace) -> None:
    if args.bundle and "=" in args.bundle:  # no bundle given: argparse took the first key=value for it
        args.overrides, args.bundle = [args.bundle, *args.overrides], None
    out = _score_predictions(args) if args.predictions else _run_evaluation(args)
    print("\n".join(summary_lines(read_summary(out))))
    print(f"report: {Path(out) / REPORT_FILE}")


def _run_evaluation(args: argparse.Namespace) -> Path:
    if not args.bundle:
        raise ValueError("give a bundle to run, or --predictions DIR to score segmentations already on disk")
    checkpoint = args.checkpoint or default_checkpoint(args.bundle)
    output = args.output or Path("outputs") / args.bundle / f"evaluation_{args.split}"
    return evaluate(args.bundle, args.data, output, checkpoint, args.split, run_overrides(args))


def _score_predictions(args: argparse.Namespace) -> Path:
    if args.bundle or args.checkpoint:
        raise ValueError("--predictions scores files on disk: give no bundle and no --checkpoint with it")
    options = parse_overrides(args.overrides)
    unknown = sorted(set(options) - {"val_fold", "dataset_dir"})
    if unknown:
        raise ValueError(
            f"with --predictions only val_fold= and dataset_dir= apply, not {', '.join(unknown)}"
        )
    output = args.output or Path(args.predictions).parent / f"evaluation_{args.split}"
    return evaluate_predictions(args.predictions, args.data, output, args.split, **options)


def _compare(args: argparse.Namespace) -> None:
    leaderboard = compare(
        args.data,
        args.output,
        [name.strip() for name in args.bundles.split(",") if name.strip()],
        epochs=args.epochs,
        minutes=args.minutes,
        folds=args.folds,
        overrides=run_overrides(args),
        tta=not args.no_tta,
        ensemble=not args.no_ensemble,
        plan=not args.no_plan,
    )
    print(leaderboard.read_text())
    print(f"leaderboard: {leaderboard} (and {leaderboard.with_suffix('.html').name})")


def _takes_overrides(command: argparse.ArgumentParser, epilog: str) -> None:
    """Tracking options, and trailing ``key=value`` arguments that ``main`` hands on as overrides."""
    add_tracking_options(command)
    command.epilog = epilog
    command.set_defaults(takes_overrides=True)


def add_train_command(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="train a bundle on a datalist (rerun to resume)")
    train.add_argument("bundle")
    train.add_argument("--data", required=True, help="MSD-style datalist JSON")
    train.add_argument("--epochs", type=int)
    train.add_argument("--output", default=None, help="run folder (default outputs/<bundle>)")
    train.add_argument("--nproc", type=int, default=1, help="processes (GPUs) under torchrun; Gloo on CPU")
    train.add_argument("--skip-check", action="store_true", help="do not check every case before training")
    train.add_argument(
        "--minutes", type=float, help="wall-clock training budget: the plan fits it (time_budget_minutes)"
    )
    train.add_argument(
        "--no-plan", action="store_true", help="train on the bundle's defaults, with no plan from the data"
    )
    train.set_defaults(func=_train)
    _takes_overrides(train, OVERRIDES_EPILOG)


def add_infer_command(commands: argparse._SubParsersAction) -> None:
    infer = commands.add_parser("infer", help="segment NIfTI files or folders")
    infer.add_argument("bundle")
    infer.add_argument("--input", nargs="+", required=True)
    infer.add_argument("--output", required=True)
    infer.add_argument("--checkpoint", help="default outputs/<bundle>/models/model.pt")
    infer.add_argument(
        "--dicom-seg", action="store_true", help="also write a DICOM SEG for DICOM series inputs"
    )
    infer.add_argument(
        "--overwrite", action="store_true", help="segment again the cases whose output exists (skipped)"
    )
    infer.add_argument(
        "--ensemble",
        metavar="BUNDLE[=CHECKPOINT],...",
        help="average the softmax of these checkpoints with the first bundle's (bundles or folds)",
    )
    infer.add_argument(
        "--nproc", type=int, default=1, help="split the cases over N processes (one per GPU, else CPU cores)"
    )
    infer.set_defaults(func=_infer)
    _takes_overrides(infer, OVERRIDES_EPILOG)


def add_evaluate_command(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "evaluate", help="Dice, IoU, HD95, ASD and volumes per case and class, with an HTML report"
    )
    evaluate.add_argument("bundle", nargs="?", help="run this bundle's network (omit with --predictions)")
    evaluate.add_argument("--data", required=True, help="MSD-style datalist with the labels")
    evaluate.add_argument("--split", default="validation", choices=["validation", "test", "train", "all"])
    evaluate.add_argument("--checkpoint")
    evaluate.add_argument(
        "--predictions", help="score <case>_seg.nii.gz files in this folder instead (no network, untracked)"
    )
    evaluate.add_argument(
        "--output", help="default outputs/<bundle>/evaluation_<split>, or beside --predictions"
    )
    evaluate.set_defaults(func=_evaluate)
    _takes_overrides(evaluate, OVERRIDES_EPILOG)


def add_compare_command(commands: argparse._SubParsersAction) -> None:
    command = commands.add_parser(
        "compare", help="train and score several bundles on the same data and budget; write a leaderboard"
    )
    command.add_argument("--data", required=True, help="datalist JSON")
    command.add_argument("--bundles", default=",".join(DEFAULT_BUNDLES), help="comma-separated bundle names")
    budget = command.add_argument_group("budget (the same for every bundle)")
    budget.add_argument("--epochs", type=int, help="epochs per bundle (with --minutes: the upper bound)")
    budget.add_argument("--minutes", type=float, help="wall-clock training minutes per bundle and fold")
    command.add_argument(
        "--folds", type=int, default=1, help="k-fold cross-validation over the datalist folds"
    )
    command.add_argument("--output", default="outputs/compare", help="folder (rerun the command to resume)")
    command.add_argument("--no-tta", action="store_true", help="skip the rows with test-time mirroring")
    command.add_argument("--no-ensemble", action="store_true", help="skip the ensemble of the best two")
    command.add_argument("--no-plan", action="store_true", help="race the bundles' defaults, unplanned")
    command.set_defaults(func=_compare)
    _takes_overrides(
        command, "Trailing key=value arguments override config ids of every bundle (spacing=[2,2,2])."
    )
