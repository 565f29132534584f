"""Rebalance latency of real dim node processes, against the physical floor.

For each cell (M configs over N node processes, all on one private ``redis-server``)
the script repeats these events and measures each from the instances' own ledger
(``create``/``disconnect`` records written by the node processes, see ``tools/chaos/ledger.py``):

``join``            a preloaded node process starts its manager
``leave``           a non-leader node gets SIGTERM (graceful stop)
``crash``           a non-leader node gets SIGKILL (then a fresh node restores N, untimed)
``leader_crash``    the leader gets SIGKILL (then a fresh node restores N, untimed)
``config_add``      a config is added to the JSON file ``get_config`` reads, then the
                    refresh hint ``Manager.refresh()`` publishes is sent
``config_change``   one config's content changes, then the refresh hint
``config_remove``   the added config is removed again, then the refresh hint

Latency is the time from the event to the last ``create``/``disconnect`` it caused,
after which every config runs exactly once, with its latest content, balanced over the
live nodes (confirmed by a quiet period with no further records). The gap of a moved
config is the time it ran nowhere: from its old instance's ``disconnect`` (or the
SIGKILL) to its new instance's ``create``. Movement is configs moved divided by the
minimum any balanced layout needs; balance is the largest load divided by the fair
share M/N.

The floor (Redis PING round trip from redis-py, pub/sub delivery to another process) is
measured in the same run, at the start and at the end.

Usage::

    python benchmarks/rebalance_latency.py                 # full run (about 20 minutes)
    python benchmarks/rebalance_latency.py --quick         # smoke run (seconds)
    python benchmarks/rebalance_latency.py --nodes 10 --configs 100 --reps 50
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

from _harness import (
    Cluster,
    cleanup,
    exit_on_sigterm,
    machine,
    measure_floor,
    ms,
    print_table,
    private_server,
    ratio,
    summary,
    workdir,
    write_report,
)

EVENTS = [
    "join",
    "leave",
    "crash",
    "leader_crash",
    "config_add",
    "config_change",
    "config_remove",
]


def settings_for(hb: float, ttl: float) -> dict[str, Any]:
    return {
        "heartbeat_interval": hb,
        "node_ttl": ttl,
        "leader_ttl": ttl,
        "config_interval": 600.0,  # config changes arrive by the refresh hint only
        "disconnect_timeout": 2.0,
        "create_backoff": 0.01,
        "create_backoff_max": 0.05,
    }


def run_cell(
    server: Any,
    work: Path,
    n_nodes: int,
    n_configs: int,
    reps: int,
    events: list[str],
    settings: dict[str, Any],
    quiet: float,
    rng: random.Random,
) -> dict[str, Any]:
    service = f"lat-{n_configs}x{n_nodes}"
    configs = [{"id": i, "v": 0} for i in range(n_configs)]
    cluster = Cluster("dim", server, work, service, configs, settings=settings, quiet=quiet)
    results: dict[str, list[dict[str, Any]]] = {e: [] for e in events}
    timeout = 10 * settings["node_ttl"] + 10
    try:
        cluster.start_nodes(n_nodes)
        cluster.prepare()
        cluster.wait_settled(timeout)
        # the idle use is measured once settled, over several heartbeats
        cluster.measure_idle_cpu(max(5.0, 5 * settings["heartbeat_interval"]))
        next_id = n_configs
        added: Optional[int] = None
        for _rep in range(reps):
            for event in events:
                leader = cluster.leader_proc()
                others = [p for p in cluster.live() if p is not leader]
                if event == "join":
                    result = cluster.measure(event, lambda: cluster.join()[1], timeout)
                elif event in ("leave", "crash"):
                    victim = rng.choice(others)
                    act = cluster.terminate if event == "leave" else cluster.kill
                    result = cluster.measure(event, lambda v=victim, a=act: a(v), timeout)
                elif event == "leader_crash":
                    if leader is None:
                        continue
                    result = cluster.measure(event, lambda v=leader: cluster.kill(v), timeout)
                elif event == "config_add":
                    if added is not None:
                        continue
                    added = next_id
                    next_id += 1
                    cluster.configs.append({"id": added, "v": 0})
                    cluster.write_configs()
                    result = cluster.measure(event, cluster.refresh_hint, timeout)
                elif event == "config_change":
                    config = rng.choice(cluster.configs)
                    config["v"] = config.get("v", 0) + 1
                    cluster.write_configs()
                    result = cluster.measure(event, cluster.refresh_hint, timeout)
                elif event == "config_remove":
                    if added is None:
                        continue
                    cluster.configs = [c for c in cluster.configs if c["id"] != added]
                    added = None
                    cluster.write_configs()
                    result = cluster.measure(event, cluster.refresh_hint, timeout)
                else:
                    raise ValueError(event)
                results[event].append(result)
                if not result["ok"]:
                    print(f"  {event}: {result['error'][:300]}", file=sys.stderr)
                # keep N nodes: a crash is restored by a fresh node (not timed)
                while len(cluster.live()) < n_nodes:
                    cluster.join()
                    cluster.wait_settled(timeout)
                    cluster.prepare()
                while len(cluster.live()) > n_nodes and event != "join":
                    cluster.terminate(rng.choice(cluster.live()))
                    cluster.wait_settled(timeout)
                    cluster.prepare()
    finally:
        cluster.close()
    return {"nodes": n_nodes, "configs": n_configs, "events": results}


def digest(cell: dict[str, Any]) -> list[dict[str, Any]]:
    """One summary row per event of a cell."""
    rows = []
    for event, results in cell["events"].items():
        ok = [r for r in results if r["ok"]]
        if not results:
            continue
        gaps = [g for r in ok for g in r["gaps"]]
        recreate = [g for r in ok for g in r["recreate_gaps"]]
        moved = sum(r["moved"] for r in ok)
        minimum = sum(r["minimum_moves"] for r in ok)
        worst_balance = max(
            (r["max_load"] / r["fair_share"] for r in ok if r["fair_share"]), default=None
        )
        worst_excess = max(
            (r["max_load"] - r["fair_share"] for r in ok if r["fair_share"]), default=None
        )
        rows.append(
            {
                "nodes": cell["nodes"],
                "configs": cell["configs"],
                "event": event,
                "runs": len(results),
                "failed": len(results) - len(ok),
                "latency": summary(r["latency"] for r in ok),
                "latency_from_ready": summary(r.get("latency_from_ready") for r in ok),
                "gap": summary(gaps),
                "recreate_gap": summary(recreate),
                "moved": moved,
                "minimum_moves": minimum,
                "moves_ratio": (moved / minimum) if minimum else (1.0 if moved == 0 else None),
                "max_load_over_fair": worst_balance,
                "max_load_minus_fair": worst_excess,
                "duplicated_configs": sum(r["duplicated_configs"] for r in ok),
                # CPU per event, less idle use: summed over the processes that created or
                # disconnected something, and the most any other process used
                "cpu_acting": summary(r["cpu"]["acting"] for r in ok if "cpu" in r),
                "cpu_others_max": summary(
                    max(r["cpu"]["others"], default=0.0) for r in ok if "cpu" in r
                ),
                # per process: the node that left (its stop()), and the median of the
                # other acting processes' medians
                "cpu_stopping": summary(
                    r["cpu"]["stopping"] for r in ok if r.get("cpu", {}).get("stopping")
                ),
                "cpu_acting_each": summary(
                    statistics.median(r["cpu"]["acting_each"])
                    for r in ok
                    if r.get("cpu", {}).get("acting_each")
                ),
                "cpu_all": summary(
                    r["cpu"]["acting"] + sum(r["cpu"]["others"]) for r in ok if "cpu" in r
                ),
            }
        )
    return rows


def show(rows: list[dict[str, Any]], rtt: float) -> None:
    table = []
    for row in rows:
        lat = row["latency"]
        gap = row["gap"] if row["gap"]["n"] else row["recreate_gap"]
        table.append(
            [
                row["nodes"],
                row["configs"],
                row["event"],
                f"{row['runs'] - row['failed']}/{row['runs']}",
                ms(lat["median"]),
                ms(lat["p95"]),
                ms(lat["max"]),
                ratio(lat["median"], rtt, 0),
                ms(row["latency_from_ready"]["median"]),
                ms(gap["median"]),
                ms(gap["max"]),
                "-" if row["moves_ratio"] is None else f"{row['moves_ratio']:.2f}",
                "-" if row["max_load_over_fair"] is None else f"{row['max_load_over_fair']:.2f}",
                row["duplicated_configs"],
                ms(row["cpu_all"]["median"]),
                ms(row["cpu_acting"]["median"]),
                ms(row["cpu_stopping"]["median"]),
                ms(row["cpu_acting_each"]["median"], 2),
                ms(row["cpu_others_max"]["median"], 2),
            ]
        )
    print_table(
        [
            "N",
            "M",
            "event",
            "ok",
            "median ms",
            "p95 ms",
            "max ms",
            "x RTT",
            "ready→ med",
            "gap med",
            "gap max",
            "moved/min",
            "max/fair",
            "dups",
            "CPU ms",
            "acting",
            "stop",
            "each",
            "idle max",
        ],
        table,
    )


def targets(rows: list[dict[str, Any]], hb: float, ttl: float) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        lat = row["latency"]
        if lat["n"] == 0:
            continue
        if row["event"] in ("join", "leave") and row["nodes"] == 10 and row["configs"] == 100:
            out.append(
                {
                    "target": f"{row['event']} N=10 M=100: median <= 10 ms, p95 <= 25 ms",
                    "median_ms": lat["median"] * 1e3,
                    "p95_ms": lat["p95"] * 1e3,
                    "met": lat["median"] <= 0.010 and lat["p95"] <= 0.025,
                }
            )
        if row["event"] in ("crash", "leader_crash"):
            bound = ttl + 2 * hb
            out.append(
                {
                    "target": f"{row['event']} N={row['nodes']} M={row['configs']}: "
                    f"within node_ttl + 2 heartbeats = {bound * 1e3:.0f} ms",
                    "median_ms": lat["median"] * 1e3,
                    "max_ms": lat["max"] * 1e3,
                    "met_median": lat["median"] <= bound,
                    "met_max": lat["max"] <= bound,
                }
            )
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 repetitions")
    p.add_argument("--nodes", type=int, nargs="+", help="N values (default 2 5 10 20)")
    p.add_argument("--configs", type=int, nargs="+", help="M values (default 100 1000)")
    p.add_argument("--reps", type=int, help="repetitions per cell (default 20)")
    p.add_argument("--events", nargs="+", choices=EVENTS, help="events (default all)")
    p.add_argument("--hb", type=float, default=0.1, help="heartbeat_interval (0.1)")
    p.add_argument("--ttl", type=float, default=1.0, help="node_ttl = leader_ttl (1.0)")
    p.add_argument("--quiet", type=float, default=0.3, help="quiet period that confirms")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--output", type=Path)
    args = p.parse_args(argv)
    exit_on_sigterm()
    nodes = args.nodes or ([2, 3] if args.quick else [2, 5, 10, 20])
    configs = args.configs or ([20] if args.quick else [100, 1000])
    reps = args.reps or (2 if args.quick else 20)
    events = args.events or EVENTS
    settings = settings_for(args.hb, args.ttl)
    rng = random.Random(args.seed)

    work = workdir("latency")
    server = private_server(work)
    try:
        info = machine(server)
        floor_start = measure_floor(server, pings=300 if args.quick else 2000)
        rtt = floor_start["rtt"]["median"]
        print(
            f"floor: PING round trip median {ms(rtt, 3)} ms, pub/sub delivery median "
            f"{ms(floor_start['pubsub']['median'], 3)} ms"
        )
        print(f"settings: {settings}\n")
        cells = []
        rows: list[dict[str, Any]] = []
        for m in configs:
            for n in nodes:
                print(f"cell N={n} M={m}: {reps} repetitions of {', '.join(events)}")
                cell = run_cell(server, work, n, m, reps, events, settings, args.quiet, rng)
                cells.append(cell)
                cell_rows = digest(cell)
                rows += cell_rows
                show(cell_rows, rtt)
                print()
        floor_end = measure_floor(server, pings=300 if args.quick else 2000)
    finally:
        cleanup(server, work)
    print("all cells:")
    show(rows, rtt)
    checks = targets(rows, args.hb, args.ttl)
    print()
    for check in checks:
        print(check)
    write_report(
        "rebalance_latency",
        {
            "machine": info,
            "settings": settings,
            "quiet": args.quiet,
            "reps": reps,
            "floor": {"start": floor_start, "end": floor_end},
            "summary": rows,
            "targets": checks,
            "cells": cells,
        },
        args.output,
        args.quick,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
