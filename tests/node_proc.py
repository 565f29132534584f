"""One dim node in its own process, for the multi-process fault tests.

Kept for compatibility: the node now lives in :mod:`dim.chaos` (``python -m dim.chaos
node``), which the chaos harness uses too. Run from the repository root::

    python -m tests.node_proc --redis URL --service S --configs N --ledger PATH \
        [--hb 0.05 --ttl 0.6 --leader-ttl 0.6 --config-interval 0.2]

See :func:`dim.chaos.node_main` for the ledger format and the signals it handles.
"""

from __future__ import annotations

import sys

from dim.chaos import node_main

if __name__ == "__main__":
    sys.exit(node_main())
