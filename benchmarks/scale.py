"""What a rebalance costs in Redis as N and M grow, and a large cluster converging.

Part 1, cost per rebalance: for each cell (N node processes, M configs) a node joins and
a node leaves gracefully, several times. A ``MONITOR`` connection on the private server
sees every command with its sender, and the commands each Lua script runs (``lua``
lines right after the call). Heartbeats (the HEARTBEAT script, by its SHA) are left out:
they are the idle cost (see ``idle_cost.py``), the same with or without a rebalance.
What remains is the rebalance: commands (script-internal ones included), round trips
(top-level commands; a pipeline counts each of its commands), script calls, bytes in
(the exact RESP size of those requests). Bytes out come from a second pass of the same
events without MONITOR (its feed is counted in ``total_net_output_bytes`` and dwarfs
the replies): ``total_net_output_bytes`` over the event, less our own INFO replies and
the heartbeat replies, estimated as the idle output rate measured just before times
the event's duration (the heartbeats renew every claim of the service whichever node
holds it, so their replies cost about the same before, during and after a move).
Settings: ``heartbeat_interval`` 1 s, ``node_ttl`` 5 s. The service is pre-seeded (fence
and version keys exist, as for any service that ran before), so the first leader places
configs at once instead of waiting one node TTL. Latencies in this part run under
MONITOR, which slows the server: they are not the latency figures.

Part 2, a large cluster: P processes hosting K managers each (in-process managers share
an interpreter; 2 cores cannot run 200 interpreters), default settings; the time from
"start" to every config running exactly once, balanced; then graceful leaves (one
manager) and joins (one more process), and the idle Redis command rate.

Usage::

    python benchmarks/scale.py                 # full run
    python benchmarks/scale.py --quick         # smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from _harness import (
    Cluster,
    MonitorTap,
    cleanup,
    counter_delta,
    exit_on_sigterm,
    machine,
    ms,
    pause,
    print_table,
    private_server,
    redis_counters,
    summary,
    workdir,
    write_report,
)

from dim import scripts
from dim.keys import Keys

HEARTBEAT_SHA = hashlib.sha1(scripts.HEARTBEAT.encode()).hexdigest()

COST_SETTINGS = {
    "heartbeat_interval": 1.0,
    "node_ttl": 5.0,
    "leader_ttl": 5.0,
    "config_interval": 600.0,
    "disconnect_timeout": 2.0,
}


def preseed(client: Any, service: str) -> None:
    """Make the service look like one that ran before (no first-leader grace period)."""
    keys = Keys(service)
    client.set(keys.fence, 1, nx=True)
    client.set(keys.version, 0, nx=True)


def info_bounds(tap: MonitorTap, start: int) -> tuple[int, int]:
    """The tap lines between our first and last INFO call after ``start``."""
    lines = tap.lines
    marks = [i for i in range(start, len(lines)) if '] "info"' in lines[i]]
    return (marks[0] + 1, marks[-1]) if len(marks) >= 2 else (start, len(lines))


def idle_out_rate(cluster: Cluster, seconds: float = 3.0) -> tuple[float, float]:
    """Bytes per second the server sends while nothing happens (the heartbeat replies),
    and the bytes of our own pair of INFO reads."""
    nulls = []
    for _ in range(5):
        a = redis_counters(cluster.client)
        b = redis_counters(cluster.client)
        nulls.append(b["net_out"] - a["net_out"])
    null_out = statistics.median(nulls)
    before = redis_counters(cluster.client)
    t0 = time.monotonic()
    pause(seconds)
    after = redis_counters(cluster.client)
    rate = (after["net_out"] - before["net_out"] - null_out) / (time.monotonic() - t0)
    return rate, null_out


def window_cost(tap: MonitorTap, start: int) -> dict[str, Any]:
    """What the cluster sent in a window, heartbeats and our own reads left out."""
    pause(0.2)  # let the tap catch up with the last INFO
    first, last = info_bounds(tap, start)
    calls = tap.calls(first, last)
    beats = [c for c in calls if c["cmd"] == "evalsha" and c["args"][1:2] == [HEARTBEAT_SHA]]
    rest = [c for c in calls if c not in beats and c["cmd"] not in ("info", "monitor")]
    per: Counter[str] = Counter()
    for c in rest:
        per[c["cmd"]] += 1
        for inner in c["inner"]:
            per[f"lua:{inner}"] += 1
    return {
        "round_trips": len(rest),
        "commands": len(rest) + sum(len(c["inner"]) for c in rest),
        "script_calls": sum(1 for c in rest if c["cmd"] in ("evalsha", "eval")),
        "per_command": dict(per),
        "net_in": sum(MonitorTap.resp_size(c["args"]) for c in rest),
        "heartbeats_left_out": len(beats),
    }


def event_action(cluster: Cluster, event: str) -> Any:
    """A join (a preloaded process starts its manager) or a graceful leave (SIGTERM to
    a node that does not lead)."""
    if event == "join":
        return lambda: cluster.join()[1]
    leader = cluster.leader_proc()
    victim = next(p for p in cluster.live() if p is not leader)
    return lambda: cluster.terminate(victim)


def cost_cell(server: Any, work: Path, n_nodes: int, n_configs: int, reps: int) -> dict[str, Any]:
    service = f"cost-{n_configs}x{n_nodes}"
    client = server.client()
    preseed(client, service)
    client.close()
    configs = [{"id": i, "v": 0} for i in range(n_configs)]
    cluster = Cluster("dim", server, work, service, configs, settings=COST_SETTINGS)
    events = ("join", "leave", "join_out", "leave_out")
    out: dict[str, list[dict[str, Any]]] = {e: [] for e in events}
    try:
        cluster.start_nodes(n_nodes, timeout=300)
        cluster.prepare()
        with MonitorTap(server) as tap:
            for _rep in range(reps):
                for event in ("join", "leave"):
                    start = tap.mark()
                    redis_counters(cluster.client)  # an INFO: marks the window's start
                    result = cluster.measure(event, event_action(cluster, event), timeout=120)
                    redis_counters(cluster.client)  # ... and its end
                    if result.get("ok"):
                        result["redis"] = window_cost(tap, start)
                    out[event].append(result)
        # bytes out: the same events again, without MONITOR
        rate, null_out = idle_out_rate(cluster)
        for _rep in range(reps):
            for event in ("join", "leave"):
                before = redis_counters(cluster.client)
                t0 = time.monotonic()
                result = cluster.measure(event, event_action(cluster, event), timeout=120)
                after = redis_counters(cluster.client)
                elapsed = time.monotonic() - t0
                if result.get("ok"):
                    beats = rate * elapsed
                    result["net_out"] = after["net_out"] - before["net_out"] - null_out - beats
                    result["net_out_beats"] = beats
                out[event + "_out"].append(result)
    finally:
        cluster.close()
    return {"nodes": n_nodes, "configs": n_configs, "events": out}


def cost_rows(cell: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for event, results in cell["events"].items():
        ok = [r for r in results if r.get("ok") and "redis" in r]
        if not ok:
            continue
        outs = [r["net_out"] for r in cell["events"].get(event + "_out", []) if "net_out" in r]

        def med(key: str, ok: list[dict[str, Any]] = ok) -> float:
            return statistics.median(r["redis"][key] for r in ok)

        moved = statistics.median(r["moved"] for r in ok)
        names = sorted({n for r in ok for n in r["redis"]["per_command"]})
        rows.append(
            {
                "nodes": cell["nodes"],
                "configs": cell["configs"],
                "event": event,
                "runs": len(ok),
                "moved": moved,
                "latency_under_monitor": summary(r["latency"] for r in ok),
                "commands": med("commands"),
                "commands_range": [
                    min(r["redis"]["commands"] for r in ok),
                    max(r["redis"]["commands"] for r in ok),
                ],
                "round_trips": med("round_trips"),
                "script_calls": med("script_calls"),
                "net_in": med("net_in"),
                "net_out": statistics.median(outs) if outs else None,
                "commands_per_move": med("commands") / moved if moved else None,
                "per_command": {
                    n: statistics.median(r["redis"]["per_command"].get(n, 0) for r in ok)
                    for n in names
                },
            }
        )
    return rows


def fit(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Least squares: cost = a * moved + b * nodes + d * configs + c (no numpy). The
    configs term shows whether the cost grows with M at a given number moved."""
    rows = [r for r in rows if r.get(key) is not None]
    if len(rows) < 5:
        return {}
    xs = [(r["moved"], r["nodes"], r["configs"], 1.0) for r in rows]
    ys = [r[key] for r in rows]
    k = len(xs[0])
    m = [[sum(x[i] * x[j] for x in xs) for j in range(k)] for i in range(k)]
    v = [sum(x[i] * y for x, y in zip(xs, ys)) for i in range(k)]
    try:
        coef = _solve(m, v)
    except ZeroDivisionError:
        return {}
    pred = [sum(c * xi for c, xi in zip(coef, x)) for x in xs]
    mean = sum(ys) / len(ys)
    ss_res = sum((y - p) ** 2 for y, p in zip(ys, pred))
    ss_tot = sum((y - mean) ** 2 for y in ys) or 1.0
    return {
        "per_moved": coef[0],
        "per_node": coef[1],
        "per_config": coef[2],
        "constant": coef[3],
        "r2": 1 - ss_res / ss_tot,
        "max_relative_error": max(abs(y - p) / abs(y) for y, p in zip(ys, pred) if y),
    }


def _solve(m: list[list[float]], v: list[float]) -> list[float]:
    """Gauss-Jordan elimination with partial pivoting."""
    k = len(v)
    a = [[*row[:], val] for row, val in zip(m, v)]
    for col in range(k):
        pivot = max(range(col, k), key=lambda r: abs(a[r][col]))
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(k):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [x - f * y for x, y in zip(a[r], a[col])]
    return [a[i][k] / a[i][i] for i in range(k)]


def large_cluster(
    server: Any,
    work: Path,
    procs: int,
    per_proc: int,
    n_configs: int,
    reps: int,
    idle_window: float,
) -> dict[str, Any]:
    service = f"large-{procs}x{per_proc}"
    client = server.client()
    preseed(client, service)
    client.close()
    configs = [{"id": i, "v": 0} for i in range(n_configs)]
    cluster = Cluster(
        "dim",
        server,
        work,
        service,
        configs,
        settings={"disconnect_timeout": 2.0},
        managers_per_proc=per_proc,
        quiet=1.5,
    )
    out: dict[str, Any] = {
        "processes": procs,
        "managers_per_process": per_proc,
        "nodes": procs * per_proc,
        "configs": n_configs,
        "settings": "dim defaults (heartbeat_interval 1 s, node_ttl 5 s)",
    }
    try:
        fresh = [cluster.spawn(wait=True) for _ in range(procs)]
        for proc in fresh:
            cluster._wait_loaded(proc)
        t0 = time.monotonic()
        for proc in fresh:
            proc.send("start")
            proc.started = True
            cluster.procs.append(proc)
        cluster.wait_settled(600)
        records = cluster.state.records
        ready = [r["t"] for r in records if r["ev"] == "ready"]
        changes = [r["t"] for r in records if r["ev"] in ("create", "disconnect")]
        out["startup"] = {
            "all_ready_after": max(ready) - t0,
            "converged_after": max(changes) - t0,
            "converged_after_last_ready": max(changes) - max(ready),
        }
        cluster.prepare()
        before = redis_counters(cluster.client)
        started = time.monotonic()
        pause(idle_window)
        idle = counter_delta(before, redis_counters(cluster.client))
        elapsed = time.monotonic() - started
        out["idle"] = {
            "seconds": elapsed,
            "commands_per_s": idle["total"] / elapsed,
            "script_calls_per_s": idle["commands"].get("evalsha", 0) / elapsed,
            "net_in_per_s": idle["net_in"] / elapsed,
            "net_out_per_s": idle["net_out"] / elapsed,
        }
        leaves, joins = [], []
        for rep in range(reps):
            proc = cluster.live()[rep % procs]
            index = len(proc.left)
            leaves.append(
                cluster.measure("leave", lambda p=proc, i=index: cluster.leave_manager(p, i), 120)
            )
            joins.append(cluster.measure("join", lambda: cluster.join()[1], 120))
        out["leave"] = leaves
        out["join"] = joins
    finally:
        cluster.close()
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--nodes", type=int, nargs="+", help="N values (default 2 5 10 20)")
    p.add_argument("--configs", type=int, nargs="+", help="M values (default 100 1000 2000)")
    p.add_argument("--reps", type=int, help="events of each kind per cell (default 3)")
    p.add_argument(
        "--large", default=None, help="PxK processes x managers (default 10x20; 0x0: none)"
    )
    p.add_argument("--large-configs", type=int, default=None, help="default 1000")
    p.add_argument("--idle-window", type=float, help="seconds of idle counting (default 10)")
    p.add_argument("--output", type=Path)
    args = p.parse_args(argv)
    exit_on_sigterm()
    nodes = args.nodes or ([2, 3] if args.quick else [2, 5, 10, 20])
    configs = args.configs or ([20, 60] if args.quick else [100, 1000, 2000])
    reps = args.reps or (1 if args.quick else 3)
    large = args.large or ("2x3" if args.quick else "10x20")
    procs, per_proc = (int(x) for x in large.split("x"))
    large_configs = args.large_configs or (30 if args.quick else 1000)

    work = workdir("scale")
    server = private_server(work)
    try:
        info = machine(server)
        cells = []
        rows: list[dict[str, Any]] = []
        for m in configs:
            for n in nodes:
                print(f"cost: N={n} M={m}", flush=True)
                cell = cost_cell(server, work, n, m, reps)
                cells.append(cell)
                rows += cost_rows(cell)
        print(f"large cluster: {procs} processes x {per_proc} managers", flush=True)
        idle_window = args.idle_window or (2.0 if args.quick else 10.0)
        big = (
            large_cluster(server, work, procs, per_proc, large_configs, reps, idle_window)
            if procs
            else None
        )
    finally:
        cleanup(server, work)

    print_table(
        [
            "N",
            "M",
            "event",
            "runs",
            "moved",
            "commands",
            "per move",
            "round trips",
            "script calls",
            "bytes in",
            "bytes out",
            "top commands",
        ],
        [
            [
                r["nodes"],
                r["configs"],
                r["event"],
                r["runs"],
                f"{r['moved']:g}",
                f"{r['commands']:.0f}",
                "-" if r["commands_per_move"] is None else f"{r['commands_per_move']:.1f}",
                f"{r['round_trips']:.0f}",
                f"{r['script_calls']:.0f}",
                f"{r['net_in']:.0f}",
                "-" if r["net_out"] is None else f"{r['net_out']:.0f}",
                " ".join(
                    f"{k}={v:g}"
                    for k, v in sorted(r["per_command"].items(), key=lambda kv: -kv[1])[:4]
                ),
            ]
            for r in rows
        ],
    )
    fits = {key: fit(rows, key) for key in ("commands", "round_trips", "net_in", "net_out")}
    print("\nfit cost = a*moved + b*nodes + d*configs + c:")
    for key, f in fits.items():
        if f:
            print(
                f"  {key:>12}: a={f['per_moved']:.2f}/move b={f['per_node']:.2f}/node "
                f"d={f['per_config']:.4f}/config c={f['constant']:.1f} R^2={f['r2']:.3f}"
            )
    if big is not None:
        print(
            f"\nlarge cluster ({big['nodes']} nodes as {procs} x {per_proc}, "
            f"{big['configs']} configs):"
        )
        print(f"  startup: {big['startup']}")
        print(
            f"  idle: {big['idle']['commands_per_s']:.0f} commands/s, "
            f"{big['idle']['script_calls_per_s']:.0f} script calls/s"
        )
        for event in ("leave", "join"):
            lat = summary(r.get("latency") for r in big[event] if r.get("ok"))
            print(
                f"  {event}: median {ms(lat['median'])} ms, max {ms(lat['max'])} ms (n={lat['n']})"
            )
    write_report(
        "scale",
        {
            "machine": info,
            "cost_settings": COST_SETTINGS,
            "summary": rows,
            "fits": fits,
            "large_cluster": big,
            "cells": cells,
        },
        args.output,
        args.quick,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
