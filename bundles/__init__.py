"""The bundle folders, installed as package data of ``pipeline`` (``pipeline.bundles``); see README.md."""
