"""Datalists: building, checking, reading, and sizing the in-memory cache."""

from pipeline.data import cache  # noqa: F401 -- the bundles name it as pipeline.data.cache
