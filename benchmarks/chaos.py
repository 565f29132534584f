"""Chaos run: real node processes, a private Redis, seeded faults, and the invariant checker.

Starts a private ``redis-server`` and N dim node processes, each behind a TCP proxy of
its own, and injects faults on a seeded schedule (``tools.chaos.model.FAULTS``):

* processes: kill -9 of a node and of the leader, graceful restart, SIGSTOP past
  node_ttl, a burst of 10 joins;
* Redis: restarted empty, down past node_ttl, restarted from a stale snapshot (SAVE,
  the placement changes, kill -9, restart from the RDB), lost writes (every key back to
  an earlier DUMP with its TTL, newer keys deleted), failover to a lagging (SIGSTOPped)
  replica, Sentinel failover (SENTINEL FAILOVER or the master killed) while a burst
  joins through Sentinel;
* network: every proxy stalled past node_ttl, latency, one node stalled for
  renew_deadline +- 2 heartbeats while its disconnects (and creates) are slow;
* callbacks and clocks: get_config failing or hanging past config_timeout, create
  failing, healthcheck hanging, create/disconnect slow within their timeouts, a
  disconnect overrunning disconnect_timeout, every callback raising a BaseException
  (CancelledError, SystemExit, KeyboardInterrupt, GreenletExit), a node's wall clock
  stepped an hour forward and back.

After each fault it waits for the cluster to settle (and any reset window to close)
and measures the recovery; at the end it stops every node with SIGTERM and checks the
ledgers (``tools.chaos.checker.check``): overlaps on two nodes or one (those a reported
disconnect overrun explains are listed apart), fencing tokens that do not strictly
grow, coverage gaps over the bounds of the lease model, a dirty shutdown. Prints a
table (recovery per kind, invariants), saves JSON, exits 1 if an invariant failed.

Usage::

    python benchmarks/chaos.py --seed 1 --minutes 3 --nodes 5 --configs 40
    python benchmarks/chaos.py --seed 7 --minutes 30            # the soak
    python benchmarks/chaos.py --seed 2 --kinds fence_stall,disconnect_overrun --minutes 5

Every fault kind runs once first (in a seeded order that takes the kinds from every
group in turn; ``--round-size`` makes that first round smaller), then kinds come from
the same seeded deck (each once before any comes again) until ``--minutes`` are up, so
a run may last a little longer. ``--dir`` keeps the ledgers and node logs.
"""

from __future__ import annotations

import sys

from _harness import ROOT

from tools.chaos.runner import run_main

RESULTS = ROOT / "benchmarks" / "results" / "chaos.json"

if __name__ == "__main__":
    sys.exit(run_main(default_output=str(RESULTS)))
