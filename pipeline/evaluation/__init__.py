"""Scoring predictions against labels: what the evaluate workflow records and how it is read back."""

from pipeline.evaluation.report import image_meta, read_metric_means, read_per_case, write_case_table

__all__ = ["image_meta", "read_metric_means", "read_per_case", "write_case_table"]
