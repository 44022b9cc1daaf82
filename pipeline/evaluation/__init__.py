"""Scoring segmentations against labels, and the report an evaluation writes.

``metrics`` scores one case (Dice, IoU, HD95, ASD, volumes, with the rule for empty masks);
``handler`` does it inside the evaluate workflow, ``predictions`` for files already on disk; both
write through ``report`` (tables, ``metrics.json``) and ``html_report`` (``report.html``).
"""

from pipeline.evaluation.handler import EvaluationReport
from pipeline.evaluation.predictions import evaluate_predictions
from pipeline.evaluation.report import CASE_TABLE, REPORT_FILE, SUMMARY_FILE, image_meta, read_summary

__all__ = [
    "CASE_TABLE",
    "REPORT_FILE",
    "SUMMARY_FILE",
    "EvaluationReport",
    "evaluate_predictions",
    "image_meta",
    "read_summary",
]
