"""Shared machinery of the process benchmarks: node processes, the ledger observer,
convergence detection, the physical floor, Redis counters, statistics and reports.

Every benchmark script imports this module first (``from _harness import ...``: a
script's own directory is on ``sys.path``), and this module puts the repository on
``sys.path``, so that the scripts import ``dim`` and the shared tooling (``tools``)
from this checkout.

The dim node processes are the node program of the chaos harness (``python -m
tools.chaos node``, :mod:`tools.chaos.node`), the tooz ones ``_tooz_node.py``; both
write the same ledger (:mod:`tools.chaos.ledger`). The observer never asks the system
under test whether it has converged: it reads the instances' own ``create`` and
``disconnect`` records and decides from them, so dim and tooz are measured the same
way. A cluster is *settled* when every config runs exactly once, with its latest
content, on a live node, the layout is final (dim: counts differ by at most one; tooz:
every live node's hash ring holds exactly the live members), and no record has arrived
for a quiet period. The latency of an event is the
time of the last ``create``/``disconnect`` it caused minus the time of the event.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from dim.keys import Keys  # noqa: E402
from dim.messages import Kind, Message  # noqa: E402
from dim.testing import RedisServer, wait_until  # noqa: E402
from tools.chaos.ledger import LedgerTail  # noqa: E402
from tools.chaos.processes import node_argv, node_env  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"
TOOZ_NODE = ROOT / "benchmarks" / "_tooz_node.py"


def pause(seconds: float) -> None:
    """Wait without ``time.sleep`` (the project's rule for loops and scripts)."""
    threading.Event().wait(max(0.0, seconds))


# -- statistics ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(values: Iterable[Optional[float]]) -> dict[str, Any]:
    """n, median, p95, min and max of the values that are not None."""
    got = [v for v in values if v is not None]
    if not got:
        return {"n": 0, "median": None, "p95": None, "min": None, "max": None}
    return {
        "n": len(got),
        "median": statistics.median(got),
        "p95": percentile(got, 95),
        "min": min(got),
        "max": max(got),
    }


def ms(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value * 1e3:.{digits}f}"


def ratio(a: Optional[float], b: Optional[float], digits: int = 2) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.{digits}f}"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print an aligned text table."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    sys.stdout.flush()


# -- machine and report -------------------------------------------------------------------


def load_average() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine(server: Optional[RedisServer] = None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": load_average(),
    }
    if server is not None:
        client = server.client()
        try:
            info["redis_version"] = client.info("server").get("redis_version")
        finally:
            client.close()
    return info


def code_version() -> dict[str, Any]:
    """The commit the benchmarked dim comes from, and whether dim/ had local changes."""

    def git(*args: str) -> Optional[str]:
        try:
            result = subprocess.run(
                ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    status = git("status", "--porcelain", "--", "dim")
    return {"commit": git("rev-parse", "HEAD"), "dim_modified": bool(status)}


def compact(value: Any) -> Any:
    """The report without per-config lists: ``gaps`` lists become their summaries."""
    if isinstance(value, dict):
        return {
            k: summary(v) if k in ("gaps", "recreate_gaps") and isinstance(v, list) else compact(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [compact(v) for v in value]
    return value


def write_report(name: str, report: dict[str, Any], output: Optional[Path], quick: bool) -> Path:
    """Save the JSON report; quick runs go to ``<name>.quick.json`` unless told otherwise."""
    path = output or RESULTS_DIR / (f"{name}.quick.json" if quick else f"{name}.json")
    report = {
        "benchmark": name,
        "quick": quick,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "code": code_version(),
        **report,
    }
    report = compact(report)
    report.setdefault("machine", {})["load_average_at_end"] = load_average()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"\nwrote {path}")
    return path


# -- the physical floor -------------------------------------------------------------------

_SUBSCRIBER = r"""
import json, sys, time, redis
client = redis.Redis(host=sys.argv[1], port=int(sys.argv[2]))
pubsub = client.pubsub(ignore_subscribe_messages=True)
pubsub.subscribe(sys.argv[3])
print("SUBSCRIBED", flush=True)
deltas = []
for message in pubsub.listen():
    now = time.monotonic()
    data = message["data"]
    if data == b"end":
        break
    deltas.append(now - float(data))
print(json.dumps(deltas), flush=True)
"""


def measure_floor(server: RedisServer, pings: int = 2000, messages: int = 300) -> dict[str, Any]:
    """Redis round trip (PING from redis-py) and pub/sub delivery to another process."""
    client = server.client()
    try:
        for _ in range(50):
            client.ping()
        rtts = []
        for _ in range(pings):
            started = time.perf_counter()
            client.ping()
            rtts.append(time.perf_counter() - started)
        channel = "bench-floor"
        sub = subprocess.Popen(
            [sys.executable, "-c", _SUBSCRIBER, server.host, str(server.port), channel],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert sub.stdout is not None
            if sub.stdout.readline().strip() != "SUBSCRIBED":
                raise RuntimeError("the pub/sub floor subscriber did not start")
            for _ in range(messages):
                client.publish(channel, repr(time.monotonic()))
                pause(0.002)
            client.publish(channel, "end")
            deltas = json.loads(sub.stdout.readline())
        finally:
            sub.wait(timeout=10)
    finally:
        client.close()
    return {
        "rtt": summary(rtts),
        "pubsub": summary(deltas),
        "pings": pings,
        "messages": messages,
    }


# -- Redis counters -----------------------------------------------------------------------


def redis_counters(client: redis.Redis) -> dict[str, Any]:
    """Commands (per name, counting those run inside Lua scripts) and network bytes."""
    stats = client.info("stats")
    commands = {
        name.replace("cmdstat_", ""): int(value["calls"])
        for name, value in client.info("commandstats").items()
    }
    return {
        "commands": commands,
        "net_in": int(stats["total_net_input_bytes"]),
        "net_out": int(stats["total_net_output_bytes"]),
    }


def counter_delta(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    commands = {
        name: after["commands"].get(name, 0) - before["commands"].get(name, 0)
        for name in after["commands"]
    }
    commands = {name: n for name, n in commands.items() if n}
    return {
        "commands": commands,
        "total": sum(commands.values()),
        "net_in": after["net_in"] - before["net_in"],
        "net_out": after["net_out"] - before["net_out"],
    }


class MonitorTap:
    """Every command the server runs, from a ``MONITOR`` connection, in a thread.

    Each line names the client that sent the command, or ``lua`` for a command a script
    ran (those follow the line of the call that ran the script: scripts are atomic).
    """

    LINE = re.compile(r"^\d+\.\d+ \[\d+ (?P<client>\S+)\] (?P<args>.*)$")
    ARG = re.compile(r'"((?:[^"\\]|\\.)*)"')
    ESCAPE = re.compile(r"\\x[0-9a-fA-F]{2}|\\.")

    def __init__(self, server: RedisServer) -> None:
        self.client = server.client()
        self.lines: list[str] = []
        self.feed_bytes = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-monitor", daemon=True)

    def __enter__(self) -> MonitorTap:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.client.close()

    def _run(self) -> None:
        with self.client.monitor() as monitor:
            connection = monitor.connection
            assert connection is not None
            self._ready.set()
            while not self._stop.is_set():
                if connection.can_read(timeout=0.05):
                    line = connection.read_response()
                    if isinstance(line, bytes):
                        line = line.decode("utf-8", "replace")
                    line = str(line)
                    self.lines.append(line)
                    self.feed_bytes += len(line.encode()) + 3  # "+<line>\r\n"

    def mark(self) -> int:
        return len(self.lines)

    @classmethod
    def args(cls, text: str) -> list[str]:
        return cls.ARG.findall(text)

    @classmethod
    def arg_bytes(cls, arg: str) -> int:
        """Length in bytes of one argument as sent (MONITOR shows it escaped)."""
        return len(cls.ESCAPE.sub("_", arg).encode())

    @classmethod
    def resp_size(cls, args: list[str]) -> int:
        """Bytes of the RESP request that carried these arguments."""
        size = len(f"*{len(args)}\r\n")
        for arg in args:
            n = cls.arg_bytes(arg)
            size += len(f"${n}\r\n") + n + 2
        return size

    def calls(self, start: int = 0, end: Optional[int] = None) -> list[dict[str, Any]]:
        """Top-level commands, each with the commands its script ran (``inner``)."""
        out: list[dict[str, Any]] = []
        for line in self.lines[start:end]:
            match = self.LINE.match(line)
            if not match:
                continue
            args = self.args(match.group("args"))
            if not args:
                continue
            if match.group("client") == "lua":
                if out:
                    out[-1]["inner"].append(args[0].lower())
                continue
            out.append(
                {"client": match.group("client"), "cmd": args[0].lower(), "args": args, "inner": []}
            )
        return out


# -- node processes -----------------------------------------------------------------------


def cpu_ns(pid: int) -> Optional[int]:
    """CPU time a live process has used, in ns, summed over its threads (Linux's
    ``/proc/<pid>/task/*/schedstat``: nanoseconds, where ``/proc/<pid>/stat`` counts 10 ms
    ticks). A thread that exits takes its time with it: dim keeps its threads, so that
    loss is small. None when the process is gone."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    total, found = 0, False
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
            found = True
        except (OSError, ValueError, IndexError):
            continue
    return total if found else None


class NodeProc:
    """One node process (it may host several dim managers)."""

    def __init__(self, popen: subprocess.Popen[bytes], managers: int) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.managers = managers
        self.loaded = False
        self.started = False
        self.gone = False  # stopped or killed: not part of the cluster any more
        self.node_ids: list[str] = []
        self.left: set[str] = set()  # managers stopped one by one ("leave I")

    def send(self, command: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write((command + "\n").encode())
        self.popen.stdin.flush()

    @property
    def live_nodes(self) -> list[str]:
        if self.gone:
            return []
        return [n for n in self.node_ids if n not in self.left]


class LedgerState:
    """What runs where, replayed from the ledger records.

    Not :class:`tools.chaos.ledger.LedgerView`: this observer must judge dim and tooz
    alike, so it knows no lease, token or Redis key; it tracks each config's content
    version (``v``), the tooz nodes' hash-ring ``view`` records and the harness's own
    ``kill`` records, and keeps the create record of every running copy for the
    analysis of an event.
    """

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        # config id -> {(pid, inst): record of its create}
        self.running: dict[Any, dict[tuple[int, int], dict[str, Any]]] = {}
        self.views: dict[str, list[str]] = {}
        self.node_pid: dict[str, int] = {}
        self.loaded: set[int] = set()
        self.last_change = 0.0

    def apply(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        ev = record["ev"]
        if ev in ("create", "disconnect", "kill", "view", "ready", "stopped"):
            self.last_change = max(self.last_change, record["t"])
        if ev == "create":
            self.running.setdefault(record["id"], {})[(record["pid"], record["inst"])] = record
        elif ev == "disconnect":
            copies = self.running.get(record["id"], {})
            copies.pop((record["pid"], record["inst"]), None)
            if not copies:
                self.running.pop(record["id"], None)
        elif ev == "kill":
            for cid in list(self.running):
                copies = self.running[cid]
                for key in [k for k in copies if k[0] == record["pid"]]:
                    del copies[key]
                if not copies:
                    del self.running[cid]
        elif ev == "view":
            self.views[record["node"]] = record["members"]
        elif ev == "ready":
            self.node_pid[record["node"]] = record["pid"]
        elif ev == "loaded":
            self.loaded.add(record["pid"])

    def layout(self) -> dict[Any, str]:
        """config id -> node, for configs running exactly once."""
        return {
            cid: next(iter(copies.values()))["node"]
            for cid, copies in self.running.items()
            if len(copies) == 1
        }


class Cluster:
    """Node processes of one system (``dim`` or ``tooz``) on a private Redis server.

    Not :class:`tools.chaos.processes.NodeProcs`, which the chaos run and the process
    tests use: this one must drive tooz nodes as well as dim's, so it judges convergence
    from the ledger alone (NodeProcs also checks dim's claims in Redis) and after a
    quiet period; and it keeps spare processes loaded, started by a ``start`` command
    on their stdin, so that a join is timed from the moment it is asked for, not from
    the interpreter's start-up.
    """

    def __init__(
        self,
        kind: str,
        server: RedisServer,
        workdir: Path,
        service: str,
        configs: list[dict[str, Any]],
        *,
        settings: Optional[dict[str, Any]] = None,
        tooz_python: Optional[str] = None,
        poll: float = 0.1,
        ttl: float = 1.0,
        managers_per_proc: int = 1,
        spares: int = 1,
        quiet: float = 0.3,
        healthcheck: bool = False,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.kind = kind
        self.extra_args = list(extra_args)
        self.server = server
        self.workdir = workdir
        self.service = service
        self.configs = [dict(c) for c in configs]
        self.settings = settings or {}
        self.tooz_python = tooz_python
        self.poll = poll
        self.ttl = ttl
        self.managers_per_proc = managers_per_proc
        self.spare_count = spares
        self.quiet = quiet
        self.healthcheck = healthcheck
        self.configs_path = workdir / f"{service}.configs.json"
        self.ledger_path = workdir / f"{service}.ledger.jsonl"
        self.log_path = workdir / f"{service}.nodes.log"
        self.ledger_path.write_text("")
        self.tail = LedgerTail()
        self.state = LedgerState()
        self.procs: list[NodeProc] = []
        self.spares: list[NodeProc] = []
        # pid -> CPU seconds per second when nothing happens (measure_idle_cpu)
        self.idle_cpu: Optional[dict[int, float]] = None
        self.client = server.client()
        self.keys = Keys(service)
        self.write_configs()

    # -- processes --------------------------------------------------------------------

    def _command(self, wait: bool, managers: int) -> list[str]:
        if self.kind == "dim":
            cmd = node_argv(
                "--redis",
                self.server.url,
                "--service",
                self.service,
                "--config-file",
                str(self.configs_path),
                "--ledger",
                str(self.ledger_path),
                "--settings",
                json.dumps(self.settings),
                "--managers",
                str(managers),
                "--commands",
            )
            if self.healthcheck:
                cmd.append("--healthcheck")
        else:
            cmd = [
                self.tooz_python or sys.executable,
                str(TOOZ_NODE),
                "--redis",
                f"redis://{self.server.host}:{self.server.port}",
                "--service",
                self.service,
                "--configs",
                str(self.configs_path),
                "--ledger",
                str(self.ledger_path),
                "--poll",
                str(self.poll),
                "--ttl",
                str(self.ttl),
            ]
        if wait:
            cmd.append("--wait")
        return cmd + self.extra_args

    def spawn(
        self, wait: bool = True, managers: Optional[int] = None, extra: Sequence[str] = ()
    ) -> NodeProc:
        managers = managers or self.managers_per_proc
        with open(self.log_path, "ab") as log:
            popen = subprocess.Popen(
                self._command(wait, managers) + list(extra),
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=str(ROOT),
                env=node_env(),
            )
        proc = NodeProc(popen, managers)
        if not wait:
            proc.started = True
            self.procs.append(proc)
        return proc

    def _fill_spares(self) -> None:
        while len(self.spares) < self.spare_count:
            self.spares.append(self.spawn(wait=True, managers=1))

    def _wait_loaded(self, proc: NodeProc, timeout: float = 60.0) -> None:
        def loaded() -> bool:
            self.refresh()
            if proc.popen.poll() is not None:
                raise RuntimeError(f"node process {proc.pid} exited; see {self.log_path}")
            return proc.pid in self.state.loaded

        wait_until(loaded, timeout, interval=0.02, message=f"process {proc.pid} to load")

    def start_nodes(self, count: int, timeout: float = 120.0, one_by_one: bool = False) -> None:
        """Start ``count`` processes at once (or one after the other, each settled
        before the next starts) and wait until the cluster has settled."""
        fresh = [self.spawn(wait=True) for _ in range(count)]
        for proc in fresh:
            self._wait_loaded(proc)
        for proc in fresh:
            proc.send("start")
            proc.started = True
            self.procs.append(proc)
            if one_by_one:
                self.wait_settled(timeout)
        self._fill_spares()
        self.wait_settled(timeout)

    def join(self) -> tuple[NodeProc, float]:
        """Start a preloaded spare; return it and the time of the event."""
        if not self.spares:
            self.prepare()
        proc = self.spares.pop(0)
        self._wait_loaded(proc)
        t0 = time.monotonic()
        proc.send("start")
        proc.started = True
        self.procs.append(proc)
        return proc, t0

    def live(self) -> list[NodeProc]:
        return [p for p in self.procs if not p.gone]

    def terminate(self, proc: NodeProc) -> float:
        t0 = time.monotonic()
        proc.popen.send_signal(signal.SIGTERM)
        proc.gone = True
        return t0

    def kill(self, proc: NodeProc) -> float:
        t0 = time.monotonic()
        proc.popen.send_signal(signal.SIGKILL)
        proc.gone = True
        proc.popen.wait()
        self.state.apply({"ev": "kill", "pid": proc.pid, "t": t0})
        return t0

    def leave_manager(self, proc: NodeProc, index: int) -> float:
        proc.left.add(proc.node_ids[index])
        t0 = time.monotonic()
        proc.send(f"leave {index}")
        return t0

    def reap(self) -> None:
        for proc in self.procs:
            if proc.gone and proc.popen.returncode is None:
                try:
                    proc.popen.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.popen.kill()
                    proc.popen.wait()

    def close(self) -> None:
        for proc in self.procs + self.spares:
            if proc.popen.poll() is None:
                try:
                    proc.popen.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs + self.spares:
            try:
                proc.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
            if proc.popen.stdin is not None:
                proc.popen.stdin.close()
        self.client.close()

    def leader_proc(self) -> Optional[NodeProc]:
        value = self.client.get(self.keys.leader)
        if value is None:
            return None
        node = value.decode().rpartition(":")[0]
        for proc in self.live():
            if node in proc.live_nodes:
                return proc
        return None

    # -- configs ------------------------------------------------------------------------

    def write_configs(self) -> None:
        tmp = self.configs_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.configs))
        os.replace(tmp, self.configs_path)

    def refresh_hint(self) -> float:
        """Ask the leader to call get_config now (what ``Manager.refresh()`` publishes)."""
        t0 = time.monotonic()
        self.client.publish(self.keys.events, Message(Kind.REFRESH, "bench").encode())
        return t0

    # -- observing ----------------------------------------------------------------------

    def refresh(self) -> int:
        records = self.tail.read([self.ledger_path])
        for record in records:
            self.state.apply(record)
            if record["ev"] == "ready":
                for proc in self.procs + self.spares:
                    if proc.pid == record["pid"] and record["node"] not in proc.node_ids:
                        proc.node_ids.append(record["node"])
        return len(records)

    def live_node_ids(self) -> Optional[list[str]]:
        nodes: list[str] = []
        for proc in self.live():
            if len(proc.node_ids) < proc.managers:
                return None  # a starting node has not reported yet
            nodes += proc.live_nodes
        return nodes

    def expected(self) -> dict[Any, Any]:
        return {c["id"]: c.get("v", 0) for c in self.configs}

    def settled(self) -> bool:
        nodes = self.live_node_ids()
        if not nodes:
            return False
        live = set(nodes)
        expected = self.expected()
        running = self.state.running
        if set(running) != set(expected):
            return False
        counts: Counter[str] = Counter()
        for cid, copies in running.items():
            if len(copies) != 1:
                return False
            record = next(iter(copies.values()))
            if record["node"] not in live or record.get("v", 0) != expected[cid]:
                return False
            counts[record["node"]] += 1
        if self.kind == "dim":
            loads = [counts.get(n, 0) for n in live]
            return max(loads) - min(loads) <= 1
        members = sorted(live)
        return all(self.state.views.get(n) == members for n in live)

    def wait_settled(self, timeout: float) -> float:
        """Wait until settled and quiet; return the monotonic time it was confirmed."""
        deadline = time.monotonic() + timeout
        while True:
            self.refresh()
            now = time.monotonic()
            if self.settled() and now - self.state.last_change >= self.quiet:
                return now
            if now > deadline:
                raise TimeoutError(self.describe())
            pause(0.01)

    def describe(self) -> str:
        nodes = self.live_node_ids()
        expected = self.expected()
        running = self.state.running
        missing = [c for c in expected if c not in running]
        extra = [c for c in running if c not in expected]
        dups = [c for c, copies in running.items() if len(copies) > 1]
        stale = [
            c
            for c, copies in running.items()
            if c in expected and any(r.get("v", 0) != expected[c] for r in copies.values())
        ]
        counts = Counter(r["node"] for copies in running.values() for r in copies.values())
        return (
            f"not settled: live={nodes} missing={missing[:10]} extra={extra[:10]} "
            f"duplicates={dups[:10]} stale={stale[:10]} loads={dict(counts)} "
            f"views={ {n: len(v) for n, v in self.state.views.items()} }"
        )

    def snapshot(self) -> dict[Any, dict[str, Any]]:
        """config id -> the create record of its one running instance."""
        self.refresh()
        return {
            cid: next(iter(copies.values()))
            for cid, copies in self.state.running.items()
            if len(copies) == 1
        }

    def measure(
        self,
        event: str,
        action: Callable[[], float],
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """Run one event (``action`` returns its time) and analyse what it caused."""
        before = self.snapshot()
        start_index = len(self.state.records)
        load_before = Counter(r["node"] for r in before.values())
        procs = [p for p in self.procs if not p.gone and p.started]
        cpu_before = {p.pid: cpu_ns(p.pid) for p in procs}
        t0 = action()
        try:
            t_settled = self.wait_settled(timeout)
        except TimeoutError as exc:
            return {"event": event, "ok": False, "error": str(exc)[:2000]}
        t_cpu = time.monotonic()
        cpu_after = {p.pid: cpu_ns(p.pid) for p in procs}
        window = [r for r in self.state.records[start_index:] if r["t"] >= t0 - 1e-6]
        result = analyse(
            event,
            t0,
            t_settled,
            before,
            window,
            self.snapshot(),
            self.live_node_ids() or [],
            load_before,
        )
        if self.idle_cpu is not None:
            # CPU per process for this event: what it used from the event until the CPU
            # was read, less its idle use over that time (its heartbeats)
            acting = {r["pid"] for r in window if r["ev"] in ("create", "disconnect")}
            per: dict[int, float] = {}
            # a node that left says what its stop took (the threads it ended take their
            # time out of its schedstat: it would read less than it had)
            stopped = {r["pid"]: r["cpu_ns"] for r in window if "cpu_ns" in r}
            for pid, was in cpu_before.items():
                if pid in stopped:
                    per[pid] = stopped[pid] / 1e9
                    continue
                now = cpu_after.get(pid)
                if was is None or now is None:
                    continue  # gone without a word (killed): not counted
                rate = self.idle_cpu.get(pid)
                if rate is None:  # a process started since: the others' median
                    rate = statistics.median(self.idle_cpu.values()) if self.idle_cpu else 0.0
                idle = rate * (t_cpu - t0)
                per[pid] = (now - was) / 1e9 - idle
            result["cpu"] = {
                "acting": sum(v for p, v in per.items() if p in acting),
                "others": sorted(v for p, v in per.items() if p not in acting),
                "acting_count": len(acting & set(per)),
                # per process: the node that left (its stop), and each other acting one
                "stopping": sum(per[p] for p in stopped if p in per),
                "acting_each": sorted(
                    v for p, v in per.items() if p in acting and p not in stopped
                ),
            }
        ready = [r["t"] for r in window if r["ev"] == "ready"]
        if ready and result["changes"]:
            # a join: also from the moment the new node's start() returned
            last = max(r["t"] for r in window if r["ev"] in ("create", "disconnect"))
            result["latency_from_ready"] = last - min(ready)
        self.prepare()
        return result

    def measure_idle_cpu(self, seconds: float) -> dict[int, float]:
        """Each node process's CPU use while nothing happens (its heartbeats), per
        second: subtracted from what an event costs."""
        procs = [p for p in self.procs if not p.gone and p.started]
        before = {p.pid: cpu_ns(p.pid) for p in procs}
        t0 = time.monotonic()
        pause(seconds)
        elapsed = time.monotonic() - t0
        rates = {}
        for p in procs:
            was, now = before[p.pid], cpu_ns(p.pid)
            if was is not None and now is not None:
                rates[p.pid] = (now - was) / 1e9 / elapsed
        self.idle_cpu = rates
        return rates

    def prepare(self) -> None:
        """Between events: reap stopped processes, load the spares (not during a measure)."""
        self.reap()
        self._fill_spares()
        for proc in self.spares:
            self._wait_loaded(proc)


# -- analysis -----------------------------------------------------------------------------


def minimum_moves(
    before: Mapping[Any, str], after_nodes: Sequence[str], configs: Iterable[Any]
) -> int:
    """Fewest configs any balanced layout on ``after_nodes`` must move (equal weights).

    Configs whose node is gone must move; the survivors keep the most they can: the
    nodes holding the most get the ceiling quotas.
    """
    wanted = {c for c in configs if c in before}
    live = set(after_nodes)
    orphans = sum(1 for c in wanted if before[c] not in live)
    kept = Counter(before[c] for c in wanted if before[c] in live)
    base, spare = divmod(len(wanted), len(after_nodes))
    ranked = sorted((kept[n] for n in after_nodes), reverse=True)
    surplus = sum(max(0, count - base - (rank < spare)) for rank, count in enumerate(ranked))
    return orphans + surplus


def analyse(
    event: str,
    t0: float,
    t_settled: float,
    before: Mapping[Any, dict[str, Any]],
    window: list[dict[str, Any]],
    after: Mapping[Any, dict[str, Any]],
    live_nodes: Sequence[str],
    load_before: Mapping[str, int],
) -> dict[str, Any]:
    """Latency, moves, gaps, duplicates and balance of one event, from its records."""
    changes = [r for r in window if r["ev"] in ("create", "disconnect")]
    latency = max((r["t"] for r in changes), default=t0) - t0
    # replay the window: copies per config over time
    copies: dict[Any, int] = {cid: 1 for cid in before}
    ended: dict[tuple[int, int], float] = {}
    overlap: dict[Any, float] = {}
    overlap_since: dict[Any, float] = {}
    for r in sorted(window, key=lambda r: r["t"]):
        if r["ev"] == "create":
            copies[r["id"]] = copies.get(r["id"], 0) + 1
            if copies[r["id"]] == 2:
                overlap_since[r["id"]] = r["t"]
        elif r["ev"] == "disconnect":
            ended[(r["pid"], r["inst"])] = r["t"]
            copies[r["id"]] = copies.get(r["id"], 0) - 1
            if copies[r["id"]] == 1 and r["id"] in overlap_since:
                since = overlap_since.pop(r["id"])
                overlap[r["id"]] = overlap.get(r["id"], 0.0) + r["t"] - since
        elif r["ev"] == "kill":
            for cid, rec in before.items():
                if rec["pid"] == r["pid"] and (rec["pid"], rec["inst"]) not in ended:
                    ended[(rec["pid"], rec["inst"])] = r["t"]
                    copies[cid] -= 1
    moved = []
    gaps = []
    recreated_gaps = []
    for cid, new in after.items():
        old = before.get(cid)
        if old is None or (old["pid"], old["inst"]) == (new["pid"], new["inst"]):
            continue
        end = ended.get((old["pid"], old["inst"]))
        gap = None if end is None else new["t"] - end
        if old["node"] != new["node"]:
            moved.append(cid)
            gaps.append(gap)
        else:
            recreated_gaps.append(gap)
    loads = Counter(r["node"] for r in after.values())
    fair = len(after) / len(live_nodes) if live_nodes else None
    max_load = max((loads.get(n, 0) for n in live_nodes), default=0)
    min_load = min((loads.get(n, 0) for n in live_nodes), default=0)
    before_nodes = {cid: r["node"] for cid, r in before.items()}
    minimum = minimum_moves(before_nodes, list(live_nodes), [c for c in after if c in before])
    return {
        "event": event,
        "ok": True,
        "latency": latency,
        "settled_after": t_settled - t0,
        "changes": len(changes),
        "moved": len(moved),
        "minimum_moves": minimum,
        "gaps": [g for g in gaps if g is not None],
        "recreate_gaps": [g for g in recreated_gaps if g is not None],
        "duplicated_configs": len(overlap),
        "overlap_total": sum(overlap.values()),
        "max_load": max_load,
        "min_load": min_load,
        "fair_share": fair,
        "nodes_before": len(load_before),
        "nodes_after": len(live_nodes),
        "configs": len(after),
    }


def tooz_python(explicit: Optional[str]) -> Optional[str]:
    """An interpreter that can import tooz: the one given, this one, or None."""
    candidates = [explicit] if explicit else [sys.executable]
    for python in candidates:
        try:
            result = subprocess.run(
                [python, "-c", "import tooz.coordination, redis"],
                capture_output=True,
                timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if result.returncode == 0:
            return python
    return None


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so the ``finally`` blocks stop every process."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def private_server(workdir: Path) -> RedisServer:
    """A private redis-server for one benchmark run (never the machine's 6379)."""
    return RedisServer(directory=workdir / "redis").start()


def workdir(prefix: str) -> Path:
    """A scratch directory for ledgers, config files, logs and the server."""
    return Path(tempfile.mkdtemp(prefix=f"dim-bench-{prefix}-"))


def cleanup(server: RedisServer, work: Path) -> None:
    """Stop the server and remove the scratch directory (``DIM_BENCH_KEEP=1`` keeps it)."""
    server.close()
    if os.environ.get("DIM_BENCH_KEEP"):
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
