"""Chaos run: real node processes, a private Redis, seeded faults, and the invariant checker.

Starts a private ``redis-server``, N dim node processes behind a TCP proxy of ours, and
injects faults on a seeded random schedule (kill -9 of a node and of the leader, graceful
restart, SIGSTOP past node_ttl, Redis restarted empty, Redis down or the network stalled
past node_ttl, slow Redis, a burst of 10 joins, get_config failing, create failing,
healthcheck hanging). After each fault it waits for the cluster to settle and measures
the recovery; at the end it stops every node with SIGTERM and checks the ledgers (see
``dim.chaos.check``). Prints a table, saves JSON, exits 1 if an invariant failed.

Usage::

    python benchmarks/chaos.py --seed 1 --minutes 2 --nodes 5 --configs 40
    python benchmarks/chaos.py --seed 7 --minutes 30            # the soak

Every fault kind runs once first (in a seeded order), so a run may last a little longer
than ``--minutes``. ``--dir`` keeps the ledgers and node logs.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Running the file directly puts benchmarks/ first on sys.path, not the repository.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dim.chaos import run_main  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "chaos.json"

if __name__ == "__main__":
    sys.exit(run_main(default_output=str(RESULTS)))
