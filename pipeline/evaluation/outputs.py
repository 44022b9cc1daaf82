"""Every file an evaluation writes, in one call: the tables and ``metrics.json`` of ``report`` and the
page of ``html_report`` (which reads ``report``'s tables, so the two meet here, not in each other)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from pipeline.evaluation.html_report import write_report
from pipeline.evaluation.report import (
    REPORT_FILE,
    SUMMARY_FILE,
    CaseResult,
    case_table_name,
    summary_document,
    write_case_table,
    write_summary,
)


def write_evaluation(
    output_dir: str | Path,
    results: Sequence[CaseResult],
    label_names: Mapping[int, str],
    *,
    modality: str = "MRI",
    postprocessing: Mapping | None = None,
    title: str = "Evaluation",
) -> dict:
    """Every output of an evaluation, written atomically; returns the ``metrics.json`` content."""
    if not results:
        raise ValueError("no case was scored, so there is nothing to report")
    output_dir = Path(output_dir)
    variants = list(results[0].scores)
    for variant in variants:
        write_case_table(output_dir / case_table_name(variant, variants), results, variant, label_names)
    document = summary_document(results, variants, label_names, postprocessing)
    write_summary(output_dir / SUMMARY_FILE, document)
    write_report(output_dir / REPORT_FILE, results, document, label_names, modality=modality, title=title)
    return document
