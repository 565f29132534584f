"""What one node's own work costs in CPU: a start, each create, each disconnect.

One node runs in this process against a private ``redis-server``; a leader runs in
another process and holds no instance (``capacity=0``), so every figure is the
measured node's alone. For M configs the script takes the CPU this process used
(every thread, ``time.process_time``) from ``start()`` until its M instances run (a
join), and from ``stop()`` until it returns (a graceful leave), each ``--reps`` times
on a fresh node (medians, first two runs dropped as warm-up). ``create`` and
``disconnect`` do nothing, so the figures are dim's own work: threads, locks, Redis
round trips. A line fitted over M gives the CPU per create and per disconnect (its
slope) and the fixed cost of a start and a stop (its intercept).

Usage::

    python benchmarks/instance_cost.py                # M = 1 10 100 400, 15 runs each
    python benchmarks/instance_cost.py --quick        # M = 1 10, 4 runs
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from _harness import (
    ROOT,
    cleanup,
    exit_on_sigterm,
    machine,
    print_table,
    private_server,
    workdir,
    write_report,
)

from dim import Manager, Settings

# the leader: another process, no instance of its own
LEADER = """
import sys
sys.path.insert(0, sys.argv[1])
from dim import Manager, Settings
configs = [{"id": i} for i in range(int(sys.argv[4]))]
settings = Settings(heartbeat_interval=1.0, node_ttl=5.0, leader_ttl=5.0)
manager = Manager(lambda: configs, lambda config: config, redis=sys.argv[2],
                  service=sys.argv[3], settings=settings, capacity=0).start()
print("LEADS" if manager.is_leader else "FOLLOWS", flush=True)
sys.stdin.read()
manager.stop()
"""

SETTINGS = Settings(heartbeat_interval=1.0, node_ttl=5.0, leader_ttl=5.0)
WARM_UP = 2


def measure(url: str, service: str, m: int, reps: int) -> dict[str, Any]:
    """``reps`` joins and leaves of a node that gets all ``m`` configs."""
    leader = subprocess.Popen(
        [sys.executable, "-c", LEADER, str(ROOT), url, service, str(m)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert leader.stdout is not None
        if leader.stdout.readline().strip() != "LEADS":
            raise RuntimeError("the leader process did not take the lead")
        runs: list[dict[str, float]] = []
        for _ in range(reps + WARM_UP):
            runs.append(one_node(url, service, m))
    finally:
        assert leader.stdin is not None
        leader.stdin.close()
        leader.wait(30)
    kept = runs[WARM_UP:]
    return {
        "configs": m,
        "runs": kept,
        "join_cpu": statistics.median(r["join_cpu"] for r in kept),
        "join_wall": statistics.median(r["join_wall"] for r in kept),
        "leave_cpu": statistics.median(r["leave_cpu"] for r in kept),
        "leave_wall": statistics.median(r["leave_wall"] for r in kept),
    }


def one_node(url: str, service: str, m: int) -> dict[str, float]:
    lock = threading.Lock()
    count = [0]
    ready = threading.Event()

    def create(config: Any) -> Any:
        with lock:
            count[0] += 1
            if count[0] == m:
                ready.set()
        return config

    manager = Manager(
        lambda: [],
        create,
        disconnect=lambda instance: None,
        redis=url,
        service=service,
        settings=SETTINGS,
    )
    cpu, wall = time.process_time(), time.monotonic()
    manager.start()
    if not ready.wait(60):
        manager.stop()
        raise RuntimeError(f"{count[0]} of {m} instances ran after 60 s")
    joined_cpu, joined_wall = time.process_time(), time.monotonic()
    manager.stop()
    left_cpu, left_wall = time.process_time(), time.monotonic()
    return {
        "join_cpu": joined_cpu - cpu,
        "join_wall": joined_wall - wall,
        "leave_cpu": left_cpu - joined_cpu,
        "leave_wall": left_wall - joined_wall,
    }


def fit(points: list[tuple[float, float]]) -> dict[str, Optional[float]]:
    """Least squares line through (x, y): slope, intercept, R²."""
    if len(points) < 2:
        return {"slope": None, "intercept": None, "r2": None}
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    intercept = my - slope * mx
    total = sum((y - my) ** 2 for y in ys)
    residual = sum((y - (intercept + slope * x)) ** 2 for x, y in points)
    return {"slope": slope, "intercept": intercept, "r2": 1 - residual / total if total else None}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="M = 1 10, 4 runs each")
    p.add_argument("--configs", type=int, nargs="+", help="M values (default 1 10 100 400)")
    p.add_argument("--reps", type=int, help="runs per M after the warm-up (default 15)")
    p.add_argument("--output", type=Path)
    args = p.parse_args(argv)
    exit_on_sigterm()
    sizes = args.configs or ([1, 10] if args.quick else [1, 10, 100, 400])
    reps = args.reps or (4 if args.quick else 15)
    work = workdir("instance-cost")
    server = private_server(work)
    try:
        info = machine(server)
        cells = [measure(server.url, f"cost-{m}", m, reps) for m in sizes]
    finally:
        cleanup(server, work)
    rows = [
        [
            c["configs"],
            f"{c['join_cpu'] * 1e3:.2f}",
            f"{c['join_wall'] * 1e3:.2f}",
            f"{c['leave_cpu'] * 1e3:.2f}",
            f"{c['leave_wall'] * 1e3:.1f}",
        ]
        for c in cells
    ]
    print_table(["M", "join CPU ms", "join wall ms", "leave CPU ms", "leave wall ms"], rows)
    lines = {
        "join": fit([(c["configs"], c["join_cpu"]) for c in cells]),
        "leave": fit([(c["configs"], c["leave_cpu"]) for c in cells]),
    }
    print()
    for name, line in lines.items():
        if line["slope"] is None:
            continue
        per = "create" if name == "join" else "disconnect"
        fixed = "start" if name == "join" else "stop"
        r2 = "-" if line["r2"] is None else f"{line['r2']:.3f}"
        print(
            f"{name}: {line['slope'] * 1e3:.3f} ms of CPU per {per}, "
            f"{line['intercept'] * 1e3:.2f} ms per {fixed} (R² {r2})"
        )
    write_report(
        "instance_cost",
        {
            "machine": info,
            "settings": {"heartbeat_interval": 1.0, "node_ttl": 5.0, "leader_ttl": 5.0},
            "reps": reps,
            "cells": cells,
            "lines": lines,
        },
        args.output,
        args.quick,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
