"""How long a crash and a Redis restart cost, against what the settings promise.

Two figures follow from the lease model (``dim.Settings``):

* **Crash takeover.** A node killed with ``kill -9`` releases nothing; its claims live
  one ``lease`` (``renew_deadline + disconnect_timeout + fence_margin``) after their last
  renewal, then another node takes them. Measured: from the ``kill -9`` to the last
  ``create`` it caused, against ``lease + heartbeat_interval``.
* **Redis restarted empty.** Running instances keep running (their nodes take their
  claims back); a config that was moving, or whose node died meanwhile, waits one
  ``reset_window``. Measured: a node is killed at the moment Redis restarts, so its
  configs must wait for the window; from the restart to their last ``create``, against
  ``reset_window + heartbeat_interval``. Also counted: instances that stopped although
  their node lived (expected 0).

Each row is a settings profile: the defaults (a heartbeat every second) and the fast
test profile. Medians with the range over the repetitions.

Usage::

    python benchmarks/takeover.py             # 5 repetitions per profile
    python benchmarks/takeover.py --quick     # 1 repetition, fast profile only
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

from _harness import (
    Cluster,
    cleanup,
    exit_on_sigterm,
    machine,
    print_table,
    private_server,
    workdir,
    write_report,
)

from dim import Settings
from dim.testing import wait_until

PROFILES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "fast": {
        "heartbeat_interval": 0.1,
        "node_ttl": 1.0,
        "leader_ttl": 1.0,
        "create_timeout": 1.0,
        "disconnect_timeout": 1.0,
    },
}


def promised(settings: dict[str, Any]) -> dict[str, float]:
    s = Settings(**settings)
    return {
        "lease": s.lease,
        "reset_window": s.reset_window,
        "takeover_bound": s.lease + s.heartbeat_interval,
        "reset_bound": s.reset_window + s.heartbeat_interval,
    }


def run_profile(name: str, settings: dict[str, Any], reps: int, base: Path) -> dict[str, Any]:
    bound = promised(settings)
    s = Settings(**settings)
    timeout = 3 * bound["reset_bound"] + 30
    crashes: list[float] = []
    resets: list[float] = []
    dropped = 0
    work = workdir(f"takeover-{name}")
    server = private_server(work)
    configs = [{"id": i} for i in range(24)]
    cluster = Cluster("dim", server, work, f"take-{name}", configs, settings=settings, quiet=0.3)
    try:
        # a server that just started opens a reset window: wait it out first
        cluster.start_nodes(4, timeout=timeout)
        cluster.prepare()
        for _ in range(reps):
            victim = next(p for p in cluster.live() if p is not cluster.leader_proc())
            result = cluster.measure("crash", lambda v=victim: cluster.kill(v), timeout)
            if result["ok"]:
                crashes.append(result["latency"])
            while len(cluster.live()) < 4:
                cluster.join()
                cluster.wait_settled(timeout)
                cluster.prepare()

            def restart() -> float:
                victim = next(p for p in cluster.live() if p is not cluster.leader_proc())
                server.kill()
                t0 = cluster.kill(victim)
                server.start()
                return t0

            before = cluster.snapshot()
            result = cluster.measure("reset", restart, timeout)
            if result["ok"]:
                resets.append(result["latency"])
                after = cluster.snapshot()
                survivors = {r["node"] for r in after.values()}
                dropped += sum(
                    1
                    for cid, rec in before.items()
                    if rec["node"] in survivors
                    and (after.get(cid) or {}).get("inst") != rec["inst"]
                )
            while len(cluster.live()) < 4:
                cluster.join()
                cluster.wait_settled(timeout)
                cluster.prepare()
            # the next round starts outside the reset window
            wait_until(lambda: not server.client().exists(cluster.keys.reset), timeout, 0.05)
    finally:
        cluster.close()
        cleanup(server, work)
    return {
        "profile": name,
        "settings": settings,
        "heartbeat_interval": s.heartbeat_interval,
        **bound,
        "crash_takeover": crashes,
        "reset_recovery": resets,
        "stopped_on_live_nodes": dropped,
    }


def med(values: list[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def show(rows: list[dict[str, Any]]) -> None:
    def cell(values: list[float], bound: float) -> str:
        if not values:
            return "-"
        return (
            f"{med(values):.2f} ({min(values):.2f}-{max(values):.2f}) "
            f"≤ {bound:.2f}: {'yes' if max(values) <= bound else 'NO'}"
        )

    print_table(
        [
            "profile",
            "lease",
            "crash takeover (s)",
            "reset window",
            "reset recovery (s)",
            "stopped on live nodes",
        ],
        [
            [
                r["profile"],
                f"{r['lease']:.2f}",
                cell(r["crash_takeover"], r["takeover_bound"]),
                f"{r['reset_window']:.2f}",
                cell(r["reset_recovery"], r["reset_bound"]),
                r["stopped_on_live_nodes"],
            ]
            for r in rows
        ],
    )


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="1 repetition, fast profile only")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    exit_on_sigterm()
    reps = 1 if args.quick else args.reps
    profiles = {"fast": PROFILES["fast"]} if args.quick else PROFILES
    rows = [run_profile(name, settings, reps, Path(".")) for name, settings in profiles.items()]
    show(rows)
    write_report("takeover", {"machine": machine(), "rows": rows}, args.output, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
