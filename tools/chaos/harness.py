"""The chaos run's options and its shared machinery (:class:`RunBase`).

:class:`ChaosOptions` says what a run does; :class:`RunBase` holds one run's state (the
Redis servers, the node processes and their proxies, the harness's ledger) and the
steps every fault is made of: settle, kill, terminate, replace, repoint the proxies,
snapshot and restore keys.
"""

from __future__ import annotations

import os
import random
import secrets
import signal
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Callable, Optional, Union

import attrs
import redis

from dim.testing import RedisServer, wait_until
from tools.chaos.control import write_control
from tools.chaos.ledger import LedgerFile, Record
from tools.chaos.model import FAULTS, KINDS, Bounds
from tools.chaos.processes import NodeProcs
from tools.chaos.proxy import ChaosProxy
from tools.chaos.sentinel import SentinelProcess, redis_command, redis_info

__all__ = ["ChaosOptions", "HarnessError", "RunBase"]


@attrs.frozen
class ChaosOptions:
    """What :class:`ChaosRun` does.

    ``minutes=0`` runs one round: every fault kind once (or ``round_size`` of them), in
    a seeded order that takes the kinds from every group in turn. With ``minutes > 0``
    that first round always completes, then the schedule goes on dealing kinds from the
    same seeded deck (every kind once before any comes again) until the time is up.

    The timings are dim's settings for every node: with the defaults a crashed node's
    claims live ``lease`` = 2 s and a reset window lasts ``create_lease`` = 4.35 s.
    """

    seed: int = 1
    minutes: float = 0.0
    nodes: int = 5
    configs: int = 40
    heartbeat_interval: float = 0.1
    node_ttl: float = 1.0
    leader_ttl: float = 1.0
    config_interval: float = 0.5
    healthcheck_interval: float = 0.5
    healthcheck_timeout: float = 0.3
    failure_cooldown: float = 2.0
    create_attempts: int = 3
    disconnect_timeout: float = 1.0
    create_timeout: float = 3.0
    config_timeout: float = 1.0
    burst: int = 10
    sentinel_burst: int = 4
    slack: float = 1.5
    settle_timeout: float = 60.0
    quiet: float = 0.3
    kinds: tuple[str, ...] = tuple(FAULTS)
    round_size: Optional[int] = None

    def settings(self) -> Record:
        return {
            "heartbeat_interval": self.heartbeat_interval,
            "node_ttl": self.node_ttl,
            "leader_ttl": self.leader_ttl,
            "config_interval": self.config_interval,
            "healthcheck_interval": self.healthcheck_interval,
            "healthcheck_timeout": self.healthcheck_timeout,
            "failure_cooldown": self.failure_cooldown,
            "create_attempts": self.create_attempts,
            "create_backoff": 0.01,
            "create_backoff_max": 0.05,
            "disconnect_timeout": self.disconnect_timeout,
            "create_timeout": self.create_timeout,
            "config_timeout": self.config_timeout,
        }

    def node_args(self) -> list[str]:
        return [
            "--hb",
            str(self.heartbeat_interval),
            "--ttl",
            str(self.node_ttl),
            "--leader-ttl",
            str(self.leader_ttl),
            "--config-interval",
            str(self.config_interval),
            "--healthcheck-interval",
            str(self.healthcheck_interval),
            "--healthcheck-timeout",
            str(self.healthcheck_timeout),
            "--failure-cooldown",
            str(self.failure_cooldown),
            "--create-attempts",
            str(self.create_attempts),
            "--disconnect-timeout",
            str(self.disconnect_timeout),
            "--create-timeout",
            str(self.create_timeout),
            "--config-timeout",
            str(self.config_timeout),
            "--connect-timeout",
            "30",
        ]


class HarnessError(RuntimeError):
    """The harness could not go on (a node crashed, the cluster never settled...)."""


class RunBase:
    """The state of one seeded chaos run and the steps its faults are made of.

    Every node reaches Redis through a :class:`~tools.chaos.proxy.ChaosProxy` of its
    own (so one node can be cut off alone, and a failover re-points them all); the
    harness talks to the current master directly. The faults themselves are in the
    ``faults_*`` modules, one mixin per group; :class:`tools.chaos.runner.ChaosRun`
    puts them together and runs the schedule.
    """

    def __init__(
        self,
        options: ChaosOptions,
        directory: Optional[Union[str, os.PathLike[str]]] = None,
        progress: Optional[Callable[[str], None]] = None,
    ) -> None:
        unknown = set(options.kinds) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown fault kinds: {sorted(unknown)}")
        if not options.kinds:
            raise ValueError("no fault kinds")
        self.options = options
        self._own_dir = directory is None
        self.dir = Path(directory or tempfile.mkdtemp(prefix="dim-chaos-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.progress = progress or (lambda line: None)
        self.rng = random.Random(options.seed)
        self.service = f"chaos-{options.seed}-{secrets.token_hex(3)}"
        self.control = self.dir / "control.json"
        self.harness = LedgerFile(self.dir / "harness.jsonl")
        self.redis = RedisServer(directory=self.dir / "redis")
        self.servers: list[RedisServer] = [self.redis]  # every server started, for cleanup
        self.sentinels: list[SentinelProcess] = []
        self.proxies: dict[int, ChaosProxy] = {}  # node pid -> its proxy
        self.procs: Optional[NodeProcs] = None
        self.client: Optional[redis.Redis] = None
        self.base: set[int] = set()  # the N nodes the cluster should have between faults
        self.bounds = Bounds.from_record({"settings": options.settings(), "slack": options.slack})
        self.began = 0.0
        self.first_round: list[str] = []

    # helpers

    def _say(self, text: str) -> None:
        self.progress(f"[{time.monotonic() - self.began:7.1f}s] {text}")

    @property
    def _procs(self) -> NodeProcs:
        assert self.procs is not None
        return self.procs

    @property
    def _client(self) -> redis.Redis:
        assert self.client is not None
        return self.client

    def _check_crashes(self) -> None:
        crashed = self._procs.crashed()
        if crashed:
            raise HarnessError(f"node processes exited on their own: {crashed}")

    def _settled(self, pids: set[int]) -> bool:
        """Settled on ``pids`` (see :meth:`NodeProcs.settled`), a leader among them, and
        no reset window open: the next fault must not start inside the last one's."""
        self._check_crashes()
        try:
            if not self._procs.settled(self._client, pids):
                return False
            if self._procs.leader_pid(self._client) not in pids:
                return False
            reset = getattr(self._procs.keys, "reset", None)
            return reset is None or not self._client.exists(reset)
        except redis.RedisError:
            return False

    def _wait_settled(self, pids: set[int]) -> Optional[float]:
        """When the cluster settled on ``pids`` (None if it did not in time)."""
        try:
            wait_until(lambda: self._settled(pids), self.options.settle_timeout, 0.02)
        except TimeoutError:
            return None
        return time.monotonic()

    def _leader(self) -> Optional[int]:
        try:
            return self._procs.leader_pid(self._client)
        except redis.RedisError:
            return None

    def _wait_leader(self) -> int:
        def leader() -> Optional[int]:
            self._check_crashes()
            pid = self._leader()
            return pid if pid in self.base else None

        found = wait_until(leader, self.options.settle_timeout, 0.02, "no leader")
        assert found is not None
        return found

    def _victim(self, leader: bool = False) -> int:
        current = self._wait_leader()
        if leader:
            return current
        return self.rng.choice(sorted(self.base - {current}))

    def _wait_fenced(self, since: float, pids: set[int], at_least: float) -> None:
        """Until every node in ``pids`` fenced itself and ``at_least`` s passed."""
        deadline = since + at_least

        def done() -> bool:
            self._check_crashes()
            return time.monotonic() >= deadline and pids <= self._procs.view().fenced(since)

        try:
            wait_until(done, self.options.settle_timeout, 0.02)
        except TimeoutError:
            fenced = self._procs.view().fenced(since)
            self._say(f"not every node fenced itself: {sorted(pids - fenced)} did not")

    def _hold(self, since: float, seconds: float) -> None:
        """Let a fault last ``seconds`` from ``since`` (a crash ends the wait)."""

        def done() -> bool:
            self._check_crashes()
            return time.monotonic() - since >= seconds

        wait_until(done, seconds + 5.0, 0.002)

    def _fault(
        self, kind: str, t_start: float, t_end: float, expect: set[int], **detail: Any
    ) -> Record:
        """Wait for the cluster to settle on ``expect``, then write the fault record."""
        settled = self._wait_settled(expect)
        record: Record = {
            "kind": kind,
            "t_start": t_start,
            "t_end": t_end,
            "settled": settled,
            "detail": detail,
        }
        self.harness.write(ev="fault", **record)
        meta = KINDS[kind]
        ref = t_end if meta.measure_from == "end" else t_start
        took = f"{settled - ref:.2f}s" if settled is not None else "NEVER"
        shown = {k: v for k, v in detail.items() if k != "blackout"}
        self._say(f"{kind} {shown}: settled after {took}")
        if settled is None:
            raise HarnessError(
                f"the cluster did not settle within {self.options.settle_timeout:g}s after {kind}"
            )
        return record

    def _control(self, **fields: Any) -> None:
        write_control(self.control, **fields)

    # node processes, each behind a proxy of its own

    def _spawn(self, count: int, *extra: str) -> list[int]:
        proxies = [ChaosProxy(self.redis.port) for _ in range(count)]
        try:
            pids = self._procs.spawn(count, *extra, redis_urls=[p.url for p in proxies])
        except BaseException:
            for proxy in proxies:
                proxy.close()
            raise
        self.proxies.update(zip(pids, proxies))
        return pids

    def _gone(self, pid: int) -> None:
        """The process is dead: close its proxy."""
        proxy = self.proxies.pop(pid, None)
        if proxy is not None:
            proxy.close()

    def _exit(self, pid: int, code: int, phase: str) -> None:
        node = self._procs.view().ready.get(pid)
        self.harness.write(
            ev="exit", pid=pid, node=node, code=code, phase=phase, t_exit=time.monotonic()
        )
        self._gone(pid)

    def _terminate(self, pids: Iterable[int], phase: str) -> dict[int, int]:
        """SIGTERM at once; record each exit (code and when) and close their proxies."""
        pids = list(pids)
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        codes = {}
        for pid in pids:
            codes[pid] = self._procs.wait_exit(pid)
            self._exit(pid, codes[pid], phase)
        self.base -= set(pids)
        return codes

    def _kill9(self, pid: int) -> tuple[float, float]:
        sent, reaped = self._procs.kill9(pid)
        node = self._procs.view().ready.get(pid)
        self.harness.write(ev="killed", pid=pid, node=node, t=reaped, t_sent=sent)
        self._gone(pid)
        self.base.discard(pid)
        return sent, reaped

    def _replace(self, count: int = 1) -> None:
        t0 = time.monotonic()
        new = set(self._spawn(count))
        self.base |= new
        self._fault("replace", t0, time.monotonic(), set(self.base), pids=sorted(new))

    def _leave(self, pids: Iterable[int]) -> None:
        pids = sorted(pids)
        t1 = time.monotonic()
        codes = self._terminate(pids, "leave_burst")
        self._fault("leave_burst", t1, time.monotonic(), set(self.base), codes=codes)

    def _pending_disconnects(self) -> list[tuple[Any, int]]:
        """Slowed disconnects of live processes called but not returned yet."""
        view = self._procs.view()
        alive = {view.ready.get(pid) for pid in self._procs.alive()}
        ended = {(iv.node, iv.inst) for iv in view.intervals if iv.end is not None}
        return [k for k in view.disconnecting if k not in ended and k[0] in alive]

    def _pending_creates(self) -> list[tuple[Any, int]]:
        """Slowed creates of live processes called but not returned yet."""
        view = self._procs.view()
        alive = {view.ready.get(pid) for pid in self._procs.alive()}
        return [k for k in view.slow_creates if k not in view.created and k[0] in alive]

    def _wait_disconnects(self) -> None:
        """Until every slowed create and disconnect has returned (a crash of the node
        meanwhile would cost create_lease, or be an overrun, not what the next fault
        measures)."""

        def none() -> bool:
            self._check_crashes()
            return not self._pending_disconnects() and not self._pending_creates()

        try:
            wait_until(none, self.options.settle_timeout, 0.02)
        except TimeoutError:
            self._say(
                f"slowed calls never returned: disconnects {self._pending_disconnects()}, "
                f"creates {self._pending_creates()}"
            )

    def _running_on(self, pid: int, count: int) -> list[Any]:
        mine = sorted(self._procs.view().running({pid}))
        return self.rng.sample(mine, min(count, len(mine)))

    # Redis: the current master, replicas, snapshots

    def _new_client(self) -> None:
        old, self.client = (
            self.client,
            self.redis.client(socket_timeout=5.0, socket_connect_timeout=5.0),
        )
        if old is not None:
            old.close()

    def _repoint(self, server: RedisServer) -> None:
        """``server`` is the master now: every proxy and the harness's client go there."""
        self.redis = server
        for proxy in list(self.proxies.values()):
            proxy.retarget(server.port)
        self._new_client()

    def _wait_reset(self, since: float) -> Optional[float]:
        """After Redis lost or rewound data: wait until a node noticed (a ``redis_reset``
        event, or the reset window in Redis), so that the settle that follows waits for
        the window to close. None if nobody noticed within 2 node_ttl + 1 s."""
        reset = getattr(self._procs.keys, "reset", None)

        def seen() -> Optional[float]:
            self._check_crashes()
            events = self._procs.view().events
            times = [
                float(r["t"])
                for r in events[-200:]
                if r.get("type") == "redis_reset" and float(r["t"]) > since
            ]
            if times:
                return min(times) - since
            try:
                if reset is not None and self._client.exists(reset):
                    return time.monotonic() - since
            except redis.RedisError:
                pass
            return None

        try:
            return wait_until(seen, 2 * self.options.node_ttl + 1.0, 0.01)
        except TimeoutError:
            self._say("no node noticed that Redis lost or rewound data")
            return None

    def _forget_snapshot(self, server: Optional[RedisServer] = None) -> None:
        """Delete the server's RDB file, so that its next start begins empty."""
        server = server or self.redis
        for name in ("dump.rdb",):
            try:
                (server.directory / name).unlink()
            except FileNotFoundError:
                pass

    def _start_replica(self) -> RedisServer:
        """A new server replicating the master, in sync when this returns.

        It is started as a master and told ``REPLICAOF`` at run time, so that a later
        restart of it (once promoted) comes back as a master.
        """
        replica = RedisServer(directory=self.dir / f"redis-{len(self.servers)}")
        self.servers.append(replica)
        replica.start()
        master = self._client
        # no 5 s wait for more replicas, no RDB file on either side
        master.config_set("repl-diskless-sync", "yes")
        master.config_set("repl-diskless-sync-delay", "0")
        with replica.client(socket_timeout=5.0) as c:
            c.config_set("repl-diskless-load", "on-empty-db")
            redis_command(c, "REPLICAOF", "127.0.0.1", str(self.redis.port))
            target = int(redis_info(master, "replication").get("master_repl_offset", 0))

            def synced() -> bool:
                info = redis_info(c, "replication")
                return (
                    info.get("master_link_status") == "up"
                    and int(info.get("slave_repl_offset", -1)) >= target
                )

            wait_until(synced, 30.0, 0.02, "the replica did not sync")
        return replica

    def _promote(self, replica: RedisServer) -> None:
        with replica.client(socket_timeout=5.0) as c:
            redis_command(c, "REPLICAOF", "NO", "ONE")
        self._repoint(replica)
        self._forget_snapshot(replica)

    def _service_keys(self) -> list[bytes]:
        return list(self._client.scan_iter(match=self._procs.keys.prefix + "*", count=1000))

    def _dump_keys(self) -> tuple[dict[bytes, tuple[Optional[bytes], int]], float]:
        """DUMP and PTTL of every key of the service at one moment (MULTI/EXEC)."""
        keys = self._service_keys()
        pipe = self._client.pipeline(transaction=True)
        for key in keys:
            pipe.dump(key)
            pipe.pttl(key)
        values = pipe.execute()
        taken = time.monotonic()
        snapshot = {k: (values[2 * i], int(values[2 * i + 1])) for i, k in enumerate(keys)}
        return snapshot, taken

    def _restore_keys(
        self, snapshot: Mapping[bytes, tuple[Optional[bytes], int]], taken: float
    ) -> dict[str, int]:
        """Every key back to its DUMP with the TTL it has left; keys born since deleted."""
        now_keys = set(self._service_keys())
        elapsed_ms = int((time.monotonic() - taken) * 1000)
        pipe = self._client.pipeline(transaction=True)
        counts = {"restored": 0, "expired": 0, "deleted": 0}
        for key in now_keys - set(snapshot):
            pipe.delete(key)
            counts["deleted"] += 1
        for key, (value, pttl) in snapshot.items():
            if value is None:
                continue
            if pttl == -1:
                pipe.restore(key, 0, value, replace=True)
            elif pttl - elapsed_ms > 0:
                pipe.restore(key, pttl - elapsed_ms, value, replace=True)
            else:
                pipe.delete(key)
                counts["expired"] += 1
                continue
            counts["restored"] += 1
        pipe.execute()
        return counts

    def _change_placement(self) -> tuple[str, Callable[[], None]]:
        """Make the placement change (a join, a leave or a crash) and let it settle;
        returns what it did and how to undo it."""
        how = self.rng.choice(["join", "leave", "kill"])
        if how == "join":
            joined = self._spawn(2)
            self.base |= set(joined)
            undo: Callable[[], None] = lambda: self._leave(joined)  # noqa: E731
        elif how == "leave":
            self._terminate([self._victim()], "leave")
            undo = self._replace
        else:
            self._kill9(self._victim())
            undo = self._replace
        if self._wait_settled(set(self.base)) is None:
            self._say(f"the placement change ({how}) did not settle")
        return how, undo

    def _pause_quietly(self) -> None:
        """The quiet stretch between two faults (``options.quiet``)."""
        threading.Event().wait(max(0.0, self.options.quiet))
