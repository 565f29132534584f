"""What an idle dim cluster costs: Redis commands per second per node, CPU per node.

Settled clusters at the **default settings** (``heartbeat_interval`` 1 s,
``healthcheck_interval`` 10 s with a trivial healthcheck) run for a window while
nothing happens. Two windows per cluster:

1. CPU: user + system time of each node process (``/proc`` via psutil), as a share of
   one core, and the Redis server's own CPU.
2. Commands: a ``MONITOR`` connection sees every command with the client that sent it.
   Commands run inside a Lua script show up as ``lua`` lines right after the call that
   ran the script, so round trips (what a client sends) and script-internal commands are
   counted apart. Clients are matched to node processes by their TCP ports. (MONITOR
   slows the server, so the CPU window runs without it.)

Usage::

    python benchmarks/idle_cost.py              # 30 s windows
    python benchmarks/idle_cost.py --quick      # 3 s windows, small clusters
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import psutil
from _harness import (
    Cluster,
    cleanup,
    exit_on_sigterm,
    machine,
    pause,
    print_table,
    private_server,
    workdir,
    write_report,
)
from scale import preseed

MONITOR_LINE = re.compile(r'^\d+\.\d+ \[\d+ (?P<client>\S+)\] "(?P<cmd>[^"]*)"')


def ports_of(pid: int) -> set[int]:
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return set()
    return {c.laddr.port for c in conns if c.laddr}


def cpu_window(cluster: Cluster, server: Any, seconds: float) -> dict[str, Any]:
    procs = {p.pid: psutil.Process(p.pid) for p in cluster.live()}
    redis_proc = psutil.Process(server.pid)

    def times() -> dict[int, float]:
        out = {}
        for pid, proc in procs.items():
            t = proc.cpu_times()
            out[pid] = t.user + t.system
        t = redis_proc.cpu_times()
        out[-1] = t.user + t.system
        return out

    before = times()
    started = time.monotonic()
    pause(seconds)
    after = times()
    elapsed = time.monotonic() - started
    per_node = {pid: (after[pid] - before[pid]) / elapsed for pid in procs}
    return {
        "seconds": elapsed,
        "per_node_share_of_core": per_node,
        "redis_share_of_core": (after[-1] - before[-1]) / elapsed,
    }


def monitor_window(cluster: Cluster, server: Any, seconds: float) -> dict[str, Any]:
    """Count commands per node process: round trips and commands run inside scripts."""
    client = server.client()
    lines: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        with client.monitor() as monitor:
            connection = monitor.connection
            assert connection is not None
            while not stop.is_set():
                if connection.can_read(timeout=0.1):
                    response = connection.read_response()
                    if isinstance(response, bytes):
                        response = response.decode("utf-8", "replace")
                    lines.append(str(response))

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    pause(0.5)  # MONITOR is on
    lines.clear()
    started = time.monotonic()
    pause(seconds)
    stop.set()
    elapsed = time.monotonic() - started
    thread.join(5)
    client.close()
    port_pid = {}
    for proc in cluster.live():
        for port in ports_of(proc.pid):
            port_pid[port] = proc.pid
    leader = cluster.leader_proc()
    per_pid: dict[int, Counter[str]] = {p.pid: Counter() for p in cluster.live()}
    inner: dict[int, int] = Counter()
    last_pid: Optional[int] = None
    for line in lines:
        match = MONITOR_LINE.match(line)
        if not match:
            continue
        who, cmd = match.group("client"), match.group("cmd").lower()
        if who == "lua":
            if last_pid is not None:
                inner[last_pid] += 1
            continue
        port = int(who.rpartition(":")[2]) if ":" in who else -1
        pid = port_pid.get(port)
        last_pid = pid
        if pid is not None:
            per_pid[pid][cmd] += 1
    nodes = []
    for proc in cluster.live():
        counts = per_pid.get(proc.pid, Counter())
        nodes.append(
            {
                "pid": proc.pid,
                "leader": proc is leader,
                "round_trips_per_s": sum(counts.values()) / elapsed,
                "script_calls_per_s": (counts["evalsha"] + counts["eval"]) / elapsed,
                "inner_commands_per_s": inner.get(proc.pid, 0) / elapsed,
                "by_command": {k: v / elapsed for k, v in counts.items()},
            }
        )
    return {"seconds": elapsed, "lines": len(lines), "nodes": nodes}


def run(server: Any, work: Path, n_nodes: int, n_configs: int, window: float) -> dict[str, Any]:
    service = f"idle-{n_configs}x{n_nodes}"
    client = server.client()
    preseed(client, service)
    client.close()
    cluster = Cluster(
        "dim",
        server,
        work,
        service,
        [{"id": i} for i in range(n_configs)],
        settings={},
        healthcheck=True,
        spares=0,
        quiet=1.5,
    )
    try:
        cluster.start_nodes(n_nodes, timeout=120)
        pause(2.0)  # past the start-up chatter
        cpu = cpu_window(cluster, server, window)
        commands = monitor_window(cluster, server, window)
    finally:
        cluster.close()
    return {"nodes": n_nodes, "configs": n_configs, "cpu": cpu, "commands": commands}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--window", type=float, help="seconds per window (default 30)")
    p.add_argument(
        "--layouts",
        nargs="+",
        help="NxM clusters (default 1x100 5x100 10x100 5x500)",
    )
    p.add_argument("--output", type=Path)
    args = p.parse_args(argv)
    exit_on_sigterm()
    window = args.window or (3.0 if args.quick else 30.0)
    layouts = args.layouts or (
        ["1x100", "3x100"] if args.quick else ["1x100", "5x100", "10x100", "5x500"]
    )
    work = workdir("idle")
    server = private_server(work)
    try:
        info = machine(server)
        results = []
        for layout in layouts:
            n, m = (int(x) for x in layout.split("x"))
            print(f"idle: {n} nodes, {m} configs, {window:g} s windows", flush=True)
            results.append(run(server, work, n, m, window))
    finally:
        cleanup(server, work)
    rows = []
    for r in results:
        for role in ("leader", "follower"):
            nodes = [x for x in r["commands"]["nodes"] if x["leader"] == (role == "leader")]
            if not nodes:
                continue
            pids = {x["pid"] for x in nodes}
            cpu = [v for pid, v in r["cpu"]["per_node_share_of_core"].items() if pid in pids]
            rows.append(
                {
                    "nodes": r["nodes"],
                    "configs": r["configs"],
                    "role": role,
                    "count": len(nodes),
                    "round_trips_per_s": _mean(x["round_trips_per_s"] for x in nodes),
                    "script_calls_per_s": _mean(x["script_calls_per_s"] for x in nodes),
                    "inner_commands_per_s": _mean(x["inner_commands_per_s"] for x in nodes),
                    "cpu_percent_of_core": 100 * _mean(cpu),
                    "cpu_percent_max": 100 * max(cpu),
                    "by_command": {
                        k: _mean(x["by_command"].get(k, 0.0) for x in nodes)
                        for k in sorted({k for x in nodes for k in x["by_command"]})
                    },
                    "redis_cpu_percent": 100 * r["cpu"]["redis_share_of_core"],
                }
            )
    print_table(
        [
            "N",
            "M",
            "role",
            "nodes",
            "cmds/s",
            "script calls/s",
            "in-script cmds/s",
            "CPU % core",
            "CPU max",
            "commands",
            "redis CPU %",
        ],
        [
            [
                row["nodes"],
                row["configs"],
                row["role"],
                row["count"],
                f"{row['round_trips_per_s']:.2f}",
                f"{row['script_calls_per_s']:.2f}",
                f"{row['inner_commands_per_s']:.1f}",
                f"{row['cpu_percent_of_core']:.2f}",
                f"{row['cpu_percent_max']:.2f}",
                " ".join(f"{k}={v:.2f}" for k, v in row["by_command"].items()),
                f"{row['redis_cpu_percent']:.2f}",
            ]
            for row in rows
        ],
    )
    write_report(
        "idle_cost",
        {
            "machine": info,
            "window_s": window,
            "settings": "dim defaults + trivial healthcheck",
            "summary": rows,
            "runs": results,
        },
        args.output,
        args.quick,
    )
    return 0


def _mean(values: Any) -> float:
    got = list(values)
    return sum(got) / len(got) if got else 0.0


if __name__ == "__main__":
    sys.exit(main())
