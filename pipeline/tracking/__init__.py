"""Where runs are recorded, under which names, and what they hold; the one place that decides what
leaves the machine (file paths to patient data and DICOM identifiers never do)."""

from pipeline.tracking.handlers import RunTracker, ValidationTracker
from pipeline.tracking.runs import add_to_run
from pipeline.tracking.store import (
    PROJECT_ROOT,
    TrackingUnavailable,
    check_reachable,
    default_tracking_uri,
    git_commit,
    new_run_name,
    training_run_name,
    training_run_of,
)

__all__ = [
    "PROJECT_ROOT",
    "RunTracker",
    "TrackingUnavailable",
    "ValidationTracker",
    "add_to_run",
    "check_reachable",
    "default_tracking_uri",
    "git_commit",
    "new_run_name",
    "training_run_name",
    "training_run_of",
]
