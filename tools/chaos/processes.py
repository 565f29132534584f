"""Node processes of one service: spawn, kill -9, SIGSTOP/SIGCONT, SIGTERM, and watch.

:class:`NodeProcs` starts node programs (:mod:`tools.chaos.node`), follows their
ledgers incrementally (:class:`~tools.chaos.ledger.LedgerView`) and tells when the
cluster has settled: every config runs exactly once, balanced, and Redis agrees.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import redis

from dim.keys import Keys
from dim.protocol import parse_owner
from dim.testing import wait_until
from tools.chaos.ledger import LedgerTail, LedgerView

__all__ = [
    "REPO_ROOT",
    "NodeProcs",
    "NotSettled",
    "leftovers",
    "node_argv",
    "node_env",
    "proc_state",
]


def _text(value: Any) -> Optional[str]:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def proc_state(pid: int) -> str:
    """The one-letter state of a process from /proc (R, S, T, Z...)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


#: The repository root: it holds ``tools`` (never installed), so node processes need it
#: on their ``PYTHONPATH`` whatever their working directory.
REPO_ROOT = Path(__file__).resolve().parents[2]


def node_env(environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The environment of a node process: ``PYTHONPATH`` names the ``dim`` this process
    uses first (so the node runs the same code), then the repository (for ``tools``)."""
    import dim

    env = dict(os.environ if environ is None else environ)
    dim_root = str(Path(dim.__file__).resolve().parent.parent)
    paths = [dim_root, str(REPO_ROOT), *env.get("PYTHONPATH", "").split(os.pathsep)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    return env


def node_argv(*args: str) -> list[str]:
    """The command line of the node program (:mod:`tools.chaos.node`) with ``args``."""
    return [sys.executable, "-m", "tools.chaos", "node", *args]


class NotSettled(TimeoutError):
    """The cluster did not settle in time."""


class NodeProcs:
    """Node processes of one service; :meth:`cleanup` kills every one still alive.

    Each process writes its own ledger (``ledger-<n>.jsonl``) unless ``shared_ledger``,
    then all write ``ledger.jsonl``. :meth:`view` follows the ledgers incrementally.
    """

    def __init__(
        self,
        directory: Union[str, os.PathLike[str]],
        redis_url: str,
        service: str,
        *,
        configs: int = 12,
        node_args: Sequence[str] = (),
        shared_ledger: bool = True,
        control: Optional[Union[str, os.PathLike[str]]] = None,
        start_timeout: float = 20.0,
        settle_timeout: float = 20.0,
        exit_timeout: float = 10.0,
    ) -> None:
        self.dir = Path(directory)
        self.redis_url = redis_url
        self.service = service
        self.keys = Keys(service)
        self.config_ids = list(range(configs))
        self.node_args = list(node_args)
        self.shared_ledger = shared_ledger
        self.control = None if control is None else str(control)
        self.ledger_path = self.dir / "ledger.jsonl"
        self.ledgers: list[Path] = [self.ledger_path] if shared_ledger else []
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.logs: dict[int, Path] = {}
        self.dead: dict[int, float] = {}  # pid -> time it was known dead (killed, exited)
        self.paused: set[int] = set()
        self.start_timeout = start_timeout
        self.settle_timeout = settle_timeout
        self.exit_timeout = exit_timeout
        self._seq = 0
        self._tail = LedgerTail()
        self._view = LedgerView()
        self._view_lock = threading.Lock()

    # processes

    def command(self, ledger: Path, *extra: str, redis_url: Optional[str] = None) -> list[str]:
        args = node_argv(
            "--redis",
            redis_url or self.redis_url,
            "--service",
            self.service,
            "--configs",
            str(len(self.config_ids)),
            "--ledger",
            str(ledger),
        )
        if self.control is not None:
            args += ["--control", self.control]
        return args + self.node_args + list(extra)

    def spawn(
        self,
        n: int,
        *extra: str,
        redis_url: Optional[str] = None,
        redis_urls: Optional[Sequence[str]] = None,
    ) -> list[int]:
        """Start ``n`` processes at once and wait until every one is ready.

        ``extra`` arguments go to each node; ``redis_url`` (default: the one given to
        the constructor) lets some processes reach Redis another way (a proxy), and
        ``redis_urls`` (one per process) gives each its own way (a proxy each).
        """
        if redis_urls is not None and len(redis_urls) != n:
            raise ValueError(f"{len(redis_urls)} redis_urls for {n} processes")
        env = node_env()
        before = dict(self.view().ready)  # a reused pid must announce a new node
        pids = []
        for i in range(n):
            url = redis_urls[i] if redis_urls is not None else redis_url
            self._seq += 1
            log_path = self.dir / f"node{self._seq}.log"
            ledger = self.ledger_path
            if not self.shared_ledger:
                ledger = self.dir / f"ledger-{self._seq}.jsonl"
                self.ledgers.append(ledger)
            with open(log_path, "wb") as out:
                proc = subprocess.Popen(
                    self.command(ledger, *extra, redis_url=url),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            self.procs[proc.pid] = proc
            self.logs[proc.pid] = log_path
            self.dead.pop(proc.pid, None)  # a pid reused by the OS: this one is new
            self.paused.discard(proc.pid)
            pids.append(proc.pid)
        try:

            def ready() -> bool:
                now = self.view().ready
                fresh = all(p in now and now[p] != before.get(p) for p in pids)
                return fresh or self._exited(pids)

            wait_until(
                ready,
                self.start_timeout,
                0.02,
                "node processes did not become ready",
            )
        except TimeoutError:
            raise RuntimeError(f"node processes did not start:\n{self.log_tails()}") from None
        if self._exited(pids):
            raise RuntimeError(f"a node process exited early:\n{self.log_tails()}")
        return pids

    def wait_exit(self, pid: int, timeout: Optional[float] = None) -> int:
        """The exit code of ``pid``; on a timeout, raise with its thread dump and log."""
        proc = self.procs[pid]
        try:
            code = proc.wait(self.exit_timeout if timeout is None else timeout)
            self.dead.setdefault(pid, time.monotonic())
            return code
        except subprocess.TimeoutExpired:
            pass
        proc.send_signal(signal.SIGUSR1)  # the node dumps its threads' stacks
        try:
            wait_until(
                lambda: "most recent call first" in self.logs[pid].read_text(errors="replace"),
                5.0,
                0.05,
            )
        except TimeoutError:
            pass
        raise TimeoutError(
            f"pid {pid} did not exit within {timeout or self.exit_timeout:g}s:\n"
            f"{self.logs[pid].read_text(errors='replace')[-20000:]}"
        )

    def _exited(self, pids: Iterable[int]) -> bool:
        return any(self.procs[p].poll() is not None for p in pids)

    def alive(self) -> set[int]:
        return {pid for pid, p in self.procs.items() if p.poll() is None and pid not in self.dead}

    def crashed(self) -> dict[int, Optional[int]]:
        """Processes that exited although nobody killed or stopped them: pid -> code."""
        return {
            pid: p.returncode
            for pid, p in self.procs.items()
            if pid not in self.dead and p.poll() is not None
        }

    def kill9(self, pid: int) -> tuple[float, float]:
        """SIGKILL; returns (time the signal was sent, time the process was reaped)."""
        sent = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        self.procs[pid].wait(self.exit_timeout)
        reaped = time.monotonic()
        self.dead[pid] = reaped
        self.paused.discard(pid)
        return sent, reaped

    def terminate(self, pids: Iterable[int]) -> dict[int, int]:
        """SIGTERM these processes at once; their exit codes (raises on a hang)."""
        pids = list(pids)
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        return {pid: self.wait_exit(pid) for pid in pids}

    def stop_proc(self, pid: int) -> float:
        """SIGSTOP; returns a time by which the process was certainly frozen."""
        os.kill(pid, signal.SIGSTOP)
        self.paused.add(pid)
        wait_until(lambda: proc_state(pid) == "T", 5.0, 0.005, f"pid {pid} did not stop")
        return time.monotonic()

    def cont_proc(self, pid: int) -> float:
        """SIGCONT; returns a time just before the process could run again."""
        resumed = time.monotonic()
        os.kill(pid, signal.SIGCONT)
        self.paused.discard(pid)
        return resumed

    def cleanup(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    try:
                        proc.send_signal(sig)
                    except ProcessLookupError:
                        pass
            try:
                proc.wait(self.exit_timeout)
            except subprocess.TimeoutExpired:  # pragma: no cover - a kernel problem
                pass

    def log_tails(self, lines: int = 15) -> str:
        out = []
        for pid, path in self.logs.items():
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                text = []
            out.append(f"--- pid {pid} ---\n" + "\n".join(text))
        return "\n".join(out)

    # views

    def view(self) -> LedgerView:
        """The ledgers so far (one object, extended with what was appended since)."""
        with self._view_lock:
            self._view.extend(self._tail.read(list(self.ledgers)))
            return self._view

    def leader_pid(self, client: redis.Redis) -> Optional[int]:
        owner = parse_owner(_text(client.get(self.keys.leader)))
        if owner is None:
            return None
        return self.view().node_pids().get(owner[0])

    def claim_holders(self, client: redis.Redis) -> dict[str, Optional[str]]:
        ckeys = [str(i) for i in self.config_ids]
        values = client.mget([self.keys.claim(c) for c in ckeys])
        out = {}
        for ckey, value in zip(ckeys, values):
            owner = parse_owner(_text(value))
            out[ckey] = owner[0] if owner else None
        return out

    def settled(self, client: Optional[redis.Redis], pids: set[int], balanced: bool = True) -> bool:
        """Each config runs exactly once, on ``pids`` only, balanced, and (if a client is
        given) the Redis claims and the leader's assignment name the very nodes that run
        them."""
        view = self.view()
        running = view.running(set(view.ready) - set(self.dead))
        if set(running) != set(self.config_ids):
            return False
        if any(len(where) != 1 or where[0] not in pids for where in running.values()):
            return False
        counts = view.counts(pids)
        if balanced and counts and max(counts) - min(counts) > 1:
            return False
        if client is not None:
            holders = self.claim_holders(client)
            assignment = {
                _text(c): _text(n) for c, n in client.hgetall(self.keys.assignment).items()
            }
            for cid, (pid,) in running.items():
                node = view.ready[pid]
                if holders.get(str(cid)) != node or assignment.get(str(cid)) != node:
                    return False
        return True

    def wait_settled(
        self, client: Optional[redis.Redis], pids: set[int], timeout: Optional[float] = None
    ) -> LedgerView:
        """Wait for :meth:`settled`; raises :class:`NotSettled` with what runs where."""

        def ok() -> bool:
            try:
                return self.settled(client, pids)
            except redis.RedisError:
                return False

        try:
            wait_until(ok, self.settle_timeout if timeout is None else timeout, 0.02)
        except TimeoutError:
            view = self.view()
            running = view.running(set(view.ready) - set(self.dead))
            raise NotSettled(
                f"not settled on {sorted(pids)}: running {sorted(running.items())}\n"
                f"{self.log_tails()}"
            ) from None
        return self.view()


def leftovers(client: redis.Redis, keys: Keys, node: Optional[str] = None) -> list[str]:
    """Claims, members and leader left in Redis (only those of ``node``, if given)."""
    left = []
    for key in sorted(client.scan_iter(match=keys.prefix + "claim:*")):
        value = _text(client.get(key))
        if value is not None and (node is None or value.startswith(node + ":")):
            left.append(f"{_text(key)}={value} (pttl {client.pttl(key)} ms)")
    left += [
        f"member {_text(n)}"
        for n in client.zrange(keys.nodes, 0, -1)
        if node is None or _text(n) == node
    ]
    leader = _text(client.get(keys.leader))
    if leader is not None and (node is None or leader.startswith(node + ":")):
        left.append(f"leader {leader} (pttl {client.pttl(keys.leader)} ms)")
    return left
