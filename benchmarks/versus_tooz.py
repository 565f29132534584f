"""dim against OpenStack tooz's partitioner (Redis driver), same harness, same run.

Both systems run as real node processes on one private ``redis-server`` and write the
same ledger (``tools/chaos/ledger.py``); the same observer measures both (see ``_harness.py``).
Events: a node joins, a node leaves gracefully (SIGTERM), a node is killed (SIGKILL).
For each: convergence time (from the event to the last ``create``/``disconnect`` it
caused), configs moved divided by the minimum a balanced layout needs, largest load
divided by the fair share, and how many configs ran twice at once (tooz has no claims,
so a new owner may start before the old one stops) or ran nowhere (the gap).

Same timing for both: dim ``heartbeat_interval`` = tooz poll (heartbeat + watchers) =
0.1 s; dim ``node_ttl`` = tooz ``membership_timeout`` = 1 s. tooz nodes use the
partitioner as documented: ``join_partitioned_group``, ``run_watchers`` every poll,
``belongs_to_self`` per config.

tooz is never a dependency of dim. Install it in its own virtualenv and point the script
at that interpreter::

    python -m venv /tmp/tooz-venv
    /tmp/tooz-venv/bin/pip install tooz redis
    python benchmarks/versus_tooz.py --tooz-python /tmp/tooz-venv/bin/python
    python benchmarks/versus_tooz.py --tooz-python /tmp/tooz-venv/bin/python --quick

(or ``pip install tooz`` into the current environment and omit ``--tooz-python``).
"""

from __future__ import annotations

import argparse
import random
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
    summary,
    tooz_python,
    workdir,
    write_report,
)
from rebalance_latency import settings_for

EVENTS = ["join", "leave", "crash"]


def run_cell(
    kind: str,
    server: Any,
    work: Path,
    n_nodes: int,
    n_configs: int,
    reps: int,
    poll: float,
    ttl: float,
    python: Optional[str],
    seed: int,
) -> dict[str, Any]:
    rng = random.Random(seed)
    service = f"vs-{kind}-{n_configs}x{n_nodes}"
    configs = [{"id": i, "v": 0} for i in range(n_configs)]
    cluster = Cluster(
        kind,
        server,
        work,
        service,
        configs,
        settings=settings_for(poll, ttl),
        tooz_python=python,
        poll=poll,
        ttl=ttl,
    )
    results: dict[str, list[dict[str, Any]]] = {e: [] for e in EVENTS}
    steady: list[float] = []
    timeout = 10 * ttl + 10
    try:
        # tooz's Partitioner misses members that join while it is being built (it reads
        # the members, then installs its watchers, which read them again), so tooz
        # nodes that start together may never agree: start them one after the other.
        cluster.start_nodes(n_nodes, one_by_one=kind == "tooz")
        cluster.prepare()
        steady.append(balance(cluster))
        for _rep in range(reps):
            for event in EVENTS:
                leader = cluster.leader_proc() if kind == "dim" else None
                others = [p for p in cluster.live() if p is not leader]
                if event == "join":
                    result = cluster.measure(event, lambda: cluster.join()[1], timeout)
                else:
                    victim = rng.choice(others)
                    act = cluster.terminate if event == "leave" else cluster.kill
                    result = cluster.measure(event, lambda v=victim, a=act: a(v), timeout)
                results[event].append(result)
                if not result["ok"]:
                    print(f"  {kind} {event}: {result['error'][:300]}", file=sys.stderr)
                while len(cluster.live()) < n_nodes:
                    cluster.join()
                    cluster.wait_settled(timeout)
                    cluster.prepare()
                    steady.append(balance(cluster))
    finally:
        cluster.close()
    return {
        "system": kind,
        "nodes": n_nodes,
        "configs": n_configs,
        "steady_max_over_fair": steady,
        "events": results,
    }


def balance(cluster: Cluster) -> float:
    """Largest load over the fair share in the settled cluster now."""
    nodes = cluster.live_node_ids() or []
    layout = cluster.state.layout()
    loads = [sum(1 for n in layout.values() if n == node) for node in nodes]
    return max(loads) / (len(layout) / len(nodes))


def digest(cell: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for event, results in cell["events"].items():
        ok = [r for r in results if r["ok"]]
        moved = sum(r["moved"] for r in ok)
        minimum = sum(r["minimum_moves"] for r in ok)
        rows.append(
            {
                "system": cell["system"],
                "nodes": cell["nodes"],
                "configs": cell["configs"],
                "event": event,
                "runs": len(results),
                "failed": len(results) - len(ok),
                "latency": summary(r["latency"] for r in ok),
                "gap": summary(g for r in ok for g in r["gaps"]),
                "moved": moved,
                "minimum_moves": minimum,
                "moves_ratio": moved / minimum if minimum else None,
                "max_over_fair": summary(
                    r["max_load"] / r["fair_share"] for r in ok if r["fair_share"]
                ),
                "duplicated_configs": sum(r["duplicated_configs"] for r in ok),
                "duplicated_per_event": summary(r["duplicated_configs"] for r in ok),
                "overlap_total": sum(r["overlap_total"] for r in ok),
            }
        )
    return rows


def compare(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """tooz over dim, per (nodes, configs, event)."""
    out = []
    by = {(r["system"], r["nodes"], r["configs"], r["event"]): r for r in rows}
    for (system, n, m, event), d in sorted(by.items()):
        if system != "dim" or ("tooz", n, m, event) not in by:
            continue
        t = by[("tooz", n, m, event)]

        def div(a: Optional[float], b: Optional[float]) -> Optional[float]:
            return a / b if a is not None and b else None

        out.append(
            {
                "nodes": n,
                "configs": m,
                "event": event,
                "latency_median_tooz_over_dim": div(t["latency"]["median"], d["latency"]["median"]),
                "latency_p95_tooz_over_dim": div(t["latency"]["p95"], d["latency"]["p95"]),
                "moves_ratio_dim": d["moves_ratio"],
                "moves_ratio_tooz": t["moves_ratio"],
                "max_over_fair_dim": d["max_over_fair"]["median"],
                "max_over_fair_tooz": t["max_over_fair"]["median"],
                "duplicated_dim": d["duplicated_configs"],
                "duplicated_tooz": t["duplicated_configs"],
            }
        )
    return out


def show(rows: list[dict[str, Any]]) -> None:
    table = []
    for r in rows:
        lat = r["latency"]
        table.append(
            [
                r["system"],
                r["nodes"],
                r["configs"],
                r["event"],
                f"{r['runs'] - r['failed']}/{r['runs']}",
                ms(lat["median"]),
                ms(lat["p95"]),
                ms(lat["max"]),
                ms(r["gap"]["median"]),
                "-" if r["moves_ratio"] is None else f"{r['moves_ratio']:.2f}",
                "-"
                if r["max_over_fair"]["median"] is None
                else f"{r['max_over_fair']['median']:.2f}",
                r["duplicated_configs"],
                ms(r["overlap_total"], 0),
            ]
        )
    print_table(
        [
            "system",
            "N",
            "M",
            "event",
            "ok",
            "median ms",
            "p95 ms",
            "max ms",
            "gap med",
            "moved/min",
            "max/fair",
            "dup cfgs",
            "dup ms",
        ],
        table,
    )


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 repetitions")
    p.add_argument("--tooz-python", help="an interpreter with tooz installed")
    p.add_argument("--nodes", type=int, nargs="+", help="N values (default 5 10)")
    p.add_argument("--configs", type=int, nargs="+", help="M values (default 100)")
    p.add_argument("--reps", type=int, help="repetitions per cell (default 20)")
    p.add_argument("--poll", type=float, default=0.1)
    p.add_argument("--ttl", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--output", type=Path)
    args = p.parse_args(argv)
    exit_on_sigterm()
    python = tooz_python(args.tooz_python)
    if python is None:
        print(
            "tooz is not importable"
            + (f" by {args.tooz_python}" if args.tooz_python else "")
            + ": python -m venv /tmp/tooz-venv && /tmp/tooz-venv/bin/pip install tooz redis, "
            "then pass --tooz-python /tmp/tooz-venv/bin/python",
            file=sys.stderr,
        )
        return 2
    nodes = args.nodes or ([3] if args.quick else [5, 10])
    configs = args.configs or ([20] if args.quick else [100])
    reps = args.reps or (2 if args.quick else 20)
    work = workdir("versus")
    server = private_server(work)
    try:
        info = machine(server)
        floor = measure_floor(server, pings=300 if args.quick else 2000)
        rows: list[dict[str, Any]] = []
        cells = []
        errors: list[dict[str, Any]] = []
        for m in configs:
            for n in nodes:
                for kind in ("dim", "tooz"):
                    print(f"{kind}: N={n} M={m}, {reps} repetitions of {', '.join(EVENTS)}")
                    try:
                        cell = run_cell(
                            kind, server, work, n, m, reps, args.poll, args.ttl, python, args.seed
                        )
                    except (TimeoutError, RuntimeError) as exc:
                        print(f"  {kind} N={n} M={m} failed: {exc}", file=sys.stderr)
                        errors.append({"system": kind, "nodes": n, "configs": m, "error": str(exc)})
                        continue
                    cells.append(cell)
                    rows += digest(cell)
        show(rows)
    finally:
        cleanup(server, work)
    ratios = compare(rows)
    print()
    print_table(
        [
            "N",
            "M",
            "event",
            "tooz/dim median",
            "tooz/dim p95",
            "moved/min dim|tooz",
            "max/fair dim|tooz",
            "dup cfgs dim|tooz",
        ],
        [
            [
                c["nodes"],
                c["configs"],
                c["event"],
                "-"
                if c["latency_median_tooz_over_dim"] is None
                else f"{c['latency_median_tooz_over_dim']:.2f}",
                "-"
                if c["latency_p95_tooz_over_dim"] is None
                else f"{c['latency_p95_tooz_over_dim']:.2f}",
                f"{_fmt(c['moves_ratio_dim'])} | {_fmt(c['moves_ratio_tooz'])}",
                f"{_fmt(c['max_over_fair_dim'])} | {_fmt(c['max_over_fair_tooz'])}",
                f"{c['duplicated_dim']} | {c['duplicated_tooz']}",
            ]
            for c in ratios
        ],
    )
    tooz_version = _tooz_version(python)
    write_report(
        "versus_tooz",
        {
            "machine": info,
            "floor": floor,
            "settings": {"poll_or_heartbeat": args.poll, "ttl": args.ttl},
            "tooz_version": tooz_version,
            "reps": reps,
            "summary": rows,
            "ratios": ratios,
            "errors": errors,
            "steady_balance": {
                f"{c['system']} N={c['nodes']} M={c['configs']}": summary(c["steady_max_over_fair"])
                for c in cells
            },
            "cells": cells,
        },
        args.output,
        args.quick,
    )
    return 0


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def _tooz_version(python: str) -> Optional[str]:
    import subprocess

    result = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('tooz'))"],
        capture_output=True,
        text=True,
    )
    return result.stdout.strip() or None


if __name__ == "__main__":
    sys.exit(main())
