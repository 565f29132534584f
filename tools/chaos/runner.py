"""The seeded chaos run: the schedule of faults, the run itself, its report and command.

:class:`ChaosRun` is :class:`~tools.chaos.harness.RunBase` with every group of faults
(``faults_*``); :meth:`ChaosRun.run` starts a private ``redis-server`` and the nodes,
injects faults on a seeded schedule, waits for the cluster to settle after each, stops
every node with SIGTERM and checks the ledgers (:func:`tools.chaos.checker.check`).
``python -m tools.chaos run`` (:func:`run_main`) prints :func:`format_report` and
saves the JSON result.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import attrs
import redis

from tools.chaos.checker import check
from tools.chaos.faults_callbacks import CallbackFaults
from tools.chaos.faults_network import NetworkFaults
from tools.chaos.faults_process import ProcessFaults
from tools.chaos.faults_redis import RedisFaults
from tools.chaos.harness import ChaosOptions, HarnessError
from tools.chaos.ledger import Record, read_records
from tools.chaos.model import FAULTS
from tools.chaos.processes import NodeProcs, NotSettled, leftovers

__all__ = ["ChaosRun", "format_report", "run_main"]


class ChaosRun(ProcessFaults, RedisFaults, NetworkFaults, CallbackFaults):
    """One seeded chaos run in ``directory`` (a temporary one by default).

    :meth:`run` returns a JSON-ready dict with the options, what happened, and the
    :class:`~tools.chaos.checker.Report` of :func:`~tools.chaos.checker.check` (under
    ``"report"``; ``result["ok"]`` says whether every invariant held).
    """

    def _deck(self) -> Iterator[str]:
        """The kinds, every one once per pass, in a seeded order that takes them from
        every group in turn (so any stretch of the deck mixes process, Redis, network
        and callback faults)."""
        kinds = list(self.options.kinds)
        while True:
            groups: dict[str, list[str]] = defaultdict(list)
            for kind in kinds:
                groups[FAULTS[kind].group].append(kind)
            order = sorted(groups)
            self.rng.shuffle(order)
            for name in order:
                self.rng.shuffle(groups[name])
            while any(groups.values()):
                for name in order:
                    if groups[name]:
                        yield groups[name].pop()

    def schedule(self) -> Iterator[str]:
        """The first round (every kind, or ``round_size`` of them), then more from the
        same deck until time is up."""
        o = self.options
        deck = self._deck()
        size = len(o.kinds) if o.round_size is None else max(1, o.round_size)
        self.first_round = [next(deck) for _ in range(size)]
        yield from self.first_round
        deadline = self.began + o.minutes * 60
        while time.monotonic() < deadline:
            yield next(deck)

    def run(self) -> Record:
        o = self.options
        self.began = time.monotonic()
        wall = time.time()
        self._control()
        self.harness.write(
            ev="run",
            seed=o.seed,
            nodes=o.nodes,
            configs=list(range(o.configs)),
            settings=o.settings(),
            slack=o.slack,
            service=self.service,
        )
        counts: dict[str, int] = defaultdict(int)
        error: Optional[str] = None
        window_start: Optional[float] = None
        try:
            self.redis.start()
            self._new_client()
            self.procs = NodeProcs(
                self.dir,
                self.redis.url,  # every node gets a proxy of its own instead (_spawn)
                self.service,
                configs=o.configs,
                node_args=o.node_args(),
                shared_ledger=False,
                control=self.control,
                start_timeout=60.0,
                settle_timeout=o.settle_timeout,
                exit_timeout=o.disconnect_timeout + 20.0,
            )
            self.base = set(self._spawn(o.nodes))
            if self._wait_settled(self.base) is None:
                raise HarnessError("the cluster never settled at the start")
            window_start = time.monotonic()
            self._say(f"{o.nodes} nodes run {o.configs} configs; faults begin")
            for kind in self.schedule():
                self._pause_quietly()
                getattr(self, f"fault_{kind}")()
                counts[kind] += 1
        except (HarnessError, NotSettled, TimeoutError, RuntimeError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            self._say(f"stopping early: {error[:2000]}")
            self.harness.write(ev="harness_error", error=error[:5000])
        except redis.RedisError as exc:
            error = f"{type(exc).__name__}: {exc}"
            self._say(f"stopping early: {error[:2000]}")
            self.harness.write(ev="harness_error", error=error[:5000])
        finally:
            self._finish(window_start)
        records = read_records(
            [self.dir / "harness.jsonl", *(self.procs.ledgers if self.procs else [])]
        )
        report = check(records)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        result: Record = {
            "ok": report.ok,
            "seed": o.seed,
            "minutes": o.minutes,
            "nodes": o.nodes,
            "configs": o.configs,
            "options": attrs.asdict(o),
            "started": wall,
            "duration": time.monotonic() - self.began,
            "first_round": list(self.first_round),
            "fault_counts": dict(counts),
            "error": error,
            "directory": None if self._own_dir else str(self.dir),
            "report": report.to_dict(),
        }
        return result

    def _finish(self, window_start: Optional[float]) -> None:
        """Stop every node with SIGTERM, record exit codes and what Redis still holds."""
        procs = self.procs
        try:
            for proxy in list(self.proxies.values()):
                proxy.heal()
            if procs is not None:
                for pid in list(procs.paused):
                    procs.cont_proc(pid)
                alive = sorted(procs.alive())
                t_end = time.monotonic()
                if window_start is not None:
                    self.harness.write(ev="window", t_start=window_start, t_end=t_end)
                self.harness.write(ev="final", pids=alive)
                for pid in alive:
                    os.kill(pid, signal.SIGTERM)
                for pid in alive:
                    try:
                        code = procs.wait_exit(pid)
                    except TimeoutError as exc:
                        code = -999
                        self.harness.write(ev="harness_error", error=str(exc)[-3000:])
                    self._exit(pid, code, "final")
                took = time.monotonic() - t_end
                self._say(f"SIGTERM to {len(alive)} nodes: all gone after {took:.2f}s")
                if self.client is not None and self.redis.running:
                    try:
                        items = leftovers(self.client, procs.keys)
                        self.harness.write(ev="leftovers", items=items)
                    except redis.RedisError as exc:
                        self.harness.write(ev="harness_error", error=f"leftovers: {exc!r}")
        finally:
            if procs is not None:
                procs.cleanup()
            for proxy in list(self.proxies.values()):
                proxy.close()
            self.proxies.clear()
            if self.client is not None:
                self.client.close()
            for sentinel in self.sentinels:
                sentinel.stop()
            for server in self.servers:
                server.stop()
            self.harness.close()


def format_report(result: Mapping[str, Any]) -> str:
    """The human-readable table of a :meth:`ChaosRun.run` result."""
    report = result["report"]
    bounds = report.get("bounds") or {}
    o = result.get("options", {})
    lines = [
        f"dim chaos run: seed {result['seed']}, {result['nodes']} nodes, "
        f"{result['configs']} configs, {result['duration']:.0f} s; heartbeat "
        f"{o.get('heartbeat_interval')} s, node_ttl {o.get('node_ttl')} s, leader_ttl "
        f"{o.get('leader_ttl')} s, disconnect_timeout {o.get('disconnect_timeout')} s, "
        f"create_timeout {o.get('create_timeout')} s; slack {bounds.get('slack')} s",
        f"lease {bounds.get('lease', 0):.2f} s, create_lease {bounds.get('create_lease', 0):.2f}"
        f" s, reset_window {bounds.get('reset_window', 0):.2f} s",
        f"first round: {', '.join(result.get('first_round') or []) or '-'}",
        "",
        f"{'fault':<18}{'n':>4}  {'recovery median / max (s)':>26}  "
        f"{'settled median / max (s)':>25}  {'bound (s)':>9}",
    ]

    def num(value: Any) -> str:
        return "-" if value is None else f"{value:.2f}"

    for kind, row in report["recovery_by_kind"].items():
        lines.append(
            f"{kind:<18}{row['count']:>4}  "
            f"{num(row['recovery_median']) + ' / ' + num(row['recovery_max']):>26}  "
            f"{num(row['settle_median']) + ' / ' + num(row['settle_max']):>25}  "
            f"{num(row['bound']):>9}"
        )
    missing = [k for k in (o.get("kinds") or []) if k not in report["recovery_by_kind"]]
    if missing:
        lines.append(f"{'(not run)':<18}{', '.join(missing)}")
    lags = [w["lag"] for w in report["wake_lags"]]
    paused = report["paused_overlaps"]
    failovers = [f["took"] for f in report["leader_failovers"]]
    exits = report["exits"]
    bad_exits = [e for e in exits if e["code"] != 0]
    lines += [
        "",
        "invariants",
        f"  (1) overlaps of one config (two nodes or one)  {len(report['overlaps'])}"
        f" ({sum(1 for x in report['overlaps'] if x.get('same_node'))} on one node)",
        f"      explained by a reported disconnect overrun  {len(report['overruns'])}"
        + (
            f", longest {max(x['duration'] for x in report['overruns']):.3f} s"
            if report["overruns"]
            else ""
        ),
        f"      overruns without a disconnect_timeout event {len(report['unreported_overruns'])}",
        f"      after SIGCONT (paused process), allowed     {len(paused)}"
        + (f", longest {max(p['duration'] for p in paused):.3f} s" if paused else ""),
        f"      wake lag after SIGCONT, max (bound {num(bounds.get('wake'))} s)"
        f"    {num(max(lags) if lags else None)} s over {len(lags)} pauses",
        f"  (2) fencing token regressions                  {len(report['token_regressions'])}"
        f" (creates without a lease: {len(report['missing_tokens'])})",
        f"  (3) coverage gaps                              {report['gaps']}"
        f", longest {report['longest_gap']:.2f} s, over bound: {len(report['gaps_over_bound'])}",
        f"      leader failover median / max (bound {num(bounds.get('leader'))} s)"
        f"  {num(statistics.median(failovers) if failovers else None)} / "
        f"{num(max(failovers) if failovers else None)} s",
        f"      get_config never called again after a hang  {len(report['config_stuck'])}",
        f"  (4) SIGTERM exits                              {len(exits) - len(bad_exits)} "
        f"of {len(exits)} exited 0; instances left running: {len(report['open_at_end'])}",
        f"      left in Redis (claims, members, leader)    "
        f"{'not checked' if report['leftovers'] is None else len(report['leftovers'])}",
        "",
    ]
    if report["violations"]:
        lines.append("FAIL: " + "; ".join(report["violations"]))
    else:
        lines.append("PASS: every invariant held")
    return "\n".join(lines)


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.chaos run",
        description="A seeded chaos run against real node processes and a private Redis.",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--minutes",
        type=float,
        default=2.0,
        help="keep injecting faults this long (the first round of every kind always "
        "completes; 0: one round)",
    )
    p.add_argument("--nodes", type=int, default=5)
    p.add_argument("--configs", type=int, default=40)
    p.add_argument("--slack", type=float, default=1.5, help="seconds allowed over each bound")
    p.add_argument("--burst", type=int, default=10, help="nodes joining at once")
    p.add_argument("--sentinel-burst", type=int, default=4, help="nodes joining via Sentinel")
    p.add_argument("--kinds", default=",".join(FAULTS), help="comma-separated fault kinds")
    p.add_argument(
        "--round-size",
        type=int,
        default=None,
        help="kinds in the first round (default: all of them); later ones come from the "
        "same seeded deck",
    )
    p.add_argument("--output", default=None, help="write the JSON result here")
    p.add_argument("--dir", default=None, help="keep ledgers and logs here")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def run_main(argv: Optional[Sequence[str]] = None, default_output: Optional[str] = None) -> int:
    """The ``run`` command: print the report, save JSON, exit 1 if an invariant failed."""
    args = _run_parser().parse_args(list(argv) if argv is not None else None)
    options = ChaosOptions(
        seed=args.seed,
        minutes=args.minutes,
        nodes=args.nodes,
        configs=args.configs,
        slack=args.slack,
        burst=args.burst,
        sentinel_burst=args.sentinel_burst,
        kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()),
        round_size=args.round_size,
    )
    progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    result = ChaosRun(options, args.dir, progress).run()
    print(format_report(result))
    output = args.output or default_output
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=1, sort_keys=True, default=str))
        print(f"saved {output}")
    return 0 if result["ok"] else 1
