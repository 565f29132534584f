"""``python -m dim``: the same as the ``dim`` command (see :mod:`dim.cli`)."""

from __future__ import annotations

import sys

from dim.cli import main

if __name__ == "__main__":
    sys.exit(main())
