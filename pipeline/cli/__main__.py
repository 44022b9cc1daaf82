"""``python -m pipeline.cli``: the ``medseg`` command, for a checkout that is not installed."""

import sys

from pipeline.cli import main

sys.exit(main())
