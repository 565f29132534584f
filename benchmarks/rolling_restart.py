"""A rolling restart of real dim node processes, with and without the placement controls.

N node processes (default 10) run M configs (default 200) on a private ``redis-server``.
One after the other, each process gets SIGTERM (a graceful stop), a new process starts in
its place, and the next one goes once the cluster has settled again: the way a deploy
replaces every process of a service. Four variants of the same restart:

``plain``     random node ids, moves at once
``paced``     ``max_concurrent_moves`` (default 5) and ``rebalance_delay`` (0.5 s)
``static``    ``node_name`` per process and ``rejoin_grace`` (5 s): a restarted process
              gets its configs back under its name
``static+paced``  both

From the instances' own ledger (``create``/``disconnect`` records) over the whole
restart: instances created, configs moved (started on another node than the one they ran
on), the most configs running nowhere at the same moment (in-flight handoffs), the total
time configs ran nowhere divided by the number of configs (gap per config), duplicates
(a config running twice at once: must be 0), and the wall time of the whole restart.

Usage::

    python benchmarks/rolling_restart.py            # 10 nodes, 200 configs (2 minutes)
    python benchmarks/rolling_restart.py --quick    # 3 nodes, 20 configs (smoke run)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Optional

from _harness import (
    Cluster,
    NodeProc,
    cleanup,
    exit_on_sigterm,
    machine,
    ms,
    print_table,
    private_server,
    workdir,
    write_report,
)

BASE = {
    "heartbeat_interval": 0.1,
    "node_ttl": 1.0,
    "leader_ttl": 1.0,
    "config_interval": 600.0,
    "disconnect_timeout": 2.0,
    "create_backoff": 0.01,
    "create_backoff_max": 0.05,
}


def variants(moves: int, delay: float, grace: float) -> dict[str, dict[str, Any]]:
    paced = {"max_concurrent_moves": moves, "rebalance_delay": delay}
    static = {"rejoin_grace": grace}
    return {
        "plain": {"settings": dict(BASE), "static": False},
        "paced": {"settings": {**BASE, **paced}, "static": False},
        "static": {"settings": {**BASE, **static}, "static": True},
        "static+paced": {"settings": {**BASE, **paced, **static}, "static": True},
    }


def spawn(cluster: Cluster, name: Optional[str]) -> NodeProc:
    return cluster.spawn(wait=False, managers=1, extra=["--node-name", name] if name else [])


def replay(records: list[dict[str, Any]], t0: float, t1: float) -> dict[str, Any]:
    """Creates, moves, in-flight peak, gap and duplicates of the records in [t0, t1]."""
    where: dict[Any, str] = {}  # config -> node of its last instance
    copies: dict[Any, int] = {}
    nowhere_since: dict[Any, float] = {}
    gap_total = 0.0
    level = peak = 0
    creates = moved = duplicates = 0
    for r in sorted(records, key=lambda r: r["t"]):
        if r["ev"] not in ("create", "disconnect"):
            continue
        cid = r["id"]
        inside = t0 <= r["t"] <= t1
        if r["ev"] == "create":
            copies[cid] = copies.get(cid, 0) + 1
            if inside:
                creates += 1
                if where.get(cid) not in (None, r["node"]):
                    moved += 1
                if copies[cid] > 1:
                    duplicates += 1
                if cid in nowhere_since:
                    gap_total += r["t"] - nowhere_since.pop(cid)
                    level -= 1
            where[cid] = r["node"]
        else:
            copies[cid] = copies.get(cid, 0) - 1
            if inside and copies[cid] == 0:
                nowhere_since[cid] = r["t"]
                level += 1
                peak = max(peak, level)
    gap_total += sum(t1 - since for since in nowhere_since.values())
    return {
        "creates": creates,
        "moved": moved,
        "max_in_flight": peak,
        "gap_total": gap_total,
        "duplicates": duplicates,
    }


def run_variant(
    server: Any, work: Path, label: str, variant: dict[str, Any], nodes: int, configs: int
) -> dict[str, Any]:
    service = "roll-" + label.replace("+", "-")
    cluster = Cluster(
        "dim",
        server,
        work,
        service,
        [{"id": i, "v": 0} for i in range(configs)],
        settings=variant["settings"],
        spares=0,
    )
    names = [f"web-{i}" if variant["static"] else None for i in range(nodes)]
    timeout = 60.0
    try:
        for name in names:
            spawn(cluster, name)
        cluster.wait_settled(timeout)
        t0 = time.monotonic()
        for i, name in enumerate(names):
            old = cluster.live()[0] if name is None else cluster.procs[i]
            cluster.terminate(old)
            old.popen.wait(timeout)
            fresh = spawn(cluster, name)
            if name is not None:  # keep the order: procs[i] is the process named web-i
                cluster.procs.remove(fresh)
                cluster.procs[i] = fresh
            cluster.wait_settled(timeout)
        t1 = time.monotonic()
        cluster.refresh()
        figures = replay(cluster.state.records, t0, t1)
    finally:
        cluster.close()
    figures.update(
        {
            "variant": label,
            "nodes": nodes,
            "configs": configs,
            "settings": variant["settings"],
            "static": variant["static"],
            "wall": t1 - t0,
            "gap_per_config": figures["gap_total"] / configs,
        }
    )
    return figures


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 nodes, 20 configs")
    p.add_argument("--nodes", type=int, default=10)
    p.add_argument("--configs", type=int, default=200)
    p.add_argument("--moves", type=int, default=5, help="max_concurrent_moves (paced)")
    p.add_argument("--delay", type=float, default=0.5, help="rebalance_delay (paced)")
    p.add_argument("--grace", type=float, default=5.0, help="rejoin_grace (static)")
    p.add_argument("--output", type=Path)
    args = p.parse_args(argv)
    exit_on_sigterm()
    nodes, configs = (3, 20) if args.quick else (args.nodes, args.configs)
    work = workdir("rolling")
    server = private_server(work)
    rows = []
    try:
        facts = machine(server)
        for label, variant in variants(args.moves, args.delay, args.grace).items():
            print(f"{label}: rolling restart of {nodes} nodes with {configs} configs", flush=True)
            rows.append(run_variant(server, work, label, variant, nodes, configs))
    finally:
        cleanup(server, work)
    print()
    print_table(
        [
            "variant",
            "created",
            "moved",
            "max in flight",
            "gap per config ms",
            "duplicates",
            "wall s",
        ],
        [
            [
                r["variant"],
                r["creates"],
                r["moved"],
                r["max_in_flight"],
                ms(r["gap_per_config"]),
                r["duplicates"],
                f"{r['wall']:.1f}",
            ]
            for r in rows
        ],
    )
    write_report(
        "rolling_restart",
        {
            "machine": facts,
            "nodes": nodes,
            "configs": configs,
            "moves": args.moves,
            "delay": args.delay,
            "grace": args.grace,
            "results": rows,
        },
        args.output,
        args.quick,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
