"""Where runs are recorded, and under which names; the one place that decides what leaves the machine."""

from pipeline.tracking.runs import add_to_run
from pipeline.tracking.store import PROJECT_ROOT, default_tracking_uri, new_run_name

__all__ = ["PROJECT_ROOT", "add_to_run", "default_tracking_uri", "new_run_name"]
