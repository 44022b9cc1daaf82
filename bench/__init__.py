"""`make bench`: ours against the MONAI model-zoo way; `python -m bench.run --help`."""
