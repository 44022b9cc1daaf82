"""The evaluate workflow's scorer: an ignite handler the config lists beside MONAI's MetricsSaver.

Each iteration it scores every decollated case (label maps or one-hot, in the label's own space,
spacing from the label's affine); at the end of the epoch it writes ``per_case.csv``, the other
variants' tables, ``metrics.json`` and ``report.html`` (``pipeline.evaluation.report``) and adds the
summary means to ``engine.state.metrics``. Both happen at EPOCH_COMPLETED, before the tracking
handler that MONAI appends after this one logs those metrics and, at COMPLETED, the files.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from pipeline.evaluation.metrics import score_case
from pipeline.evaluation.outputs import write_evaluation
from pipeline.evaluation.report import CaseResult, flat_means
from pipeline.postprocessing import channel_argmax, voxel_spacing
from pipeline.tracking.safe import case_label


def label_map(volume: torch.Tensor) -> np.ndarray:
    """A (C, ...) prediction or label as one integer label map: argmax when one-hot."""
    data = volume.detach().cpu()
    data = channel_argmax(data) if data.shape[0] > 1 else data[0]
    return np.rint(data.numpy()).astype(np.int32)


def source_file(volume: Any) -> str | None:
    meta = getattr(volume, "meta", None) or {}
    name = meta.get("filename_or_obj")
    return str(name) if name else None


class EvaluationReport:
    """Scores every case of the evaluator and writes the evaluation's report.

    Args:
        output_dir: where the tables, ``metrics.json`` and ``report.html`` go.
        label_names: class index -> name (the background is not scored).
        predictions: variant name -> key of its prediction in the engine output, first one primary
            (``{postprocessed: pred, argmax: pred_argmax}``; see ``report.VARIANT_TITLES``).
        postprocessing: the run's post-processing settings, shown in the report and ``metrics.json``.
    """

    def __init__(
        self,
        output_dir: str | Path,
        label_names: Mapping[int, str],
        predictions: Mapping[str, str] | None = None,
        label_key: str = "label",
        image_key: str = "image",
        modality: str = "MRI",
        postprocessing: Mapping[str, Any] | None = None,
        title: str = "Evaluation",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.label_names = {int(k): str(v) for k, v in label_names.items()}
        self.predictions = dict(predictions or {"postprocessed": "pred"})
        self.label_key, self.image_key = label_key, image_key
        self.modality = modality
        self.postprocessing = postprocessing
        self.title = title
        self.results: list[CaseResult] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._score_batch)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._finish)

    def _reset(self, _: Engine) -> None:
        self.results.clear()

    def _score_batch(self, engine: Engine) -> None:
        for item in engine.state.output:
            self.results.append(self.score_item(item))

    def score_item(self, item: Mapping[str, Any]) -> CaseResult:
        image, label = item[self.image_key], item[self.label_key]
        name = case_label(source_file(image) or source_file(label) or f"case{len(self.results)}")
        truth, spacing = label_map(label), voxel_spacing(label)
        classes = [i for i in sorted(self.label_names) if i > 0]
        scores = {}
        for variant, key in self.predictions.items():
            try:
                scores[variant] = score_case(label_map(item[key]), truth, spacing, classes)
            except ValueError as error:
                raise ValueError(f"case {name}: {error}") from None
        primary = item[next(iter(self.predictions.values()))]
        saved = (getattr(primary, "meta", None) or {}).get("saved_to")  # SaveImaged's savepath_in_metadict
        return CaseResult(name, scores, source_file(image), source_file(label), str(saved) if saved else None)

    def _finish(self, engine: Engine) -> None:
        document = write_evaluation(
            self.output_dir, sorted(self.results, key=lambda r: r.case), self.label_names,
            modality=self.modality, postprocessing=self.postprocessing, title=self.title,
        )  # fmt: skip
        engine.state.metrics.update(flat_means(document))
