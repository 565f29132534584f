"""The node program: real dim managers whose instances write their lives to a ledger.

One program for every process-level user: the chaos run, the process tests and the
benchmarks. Run from the repository root (or with it on ``PYTHONPATH``)::

    python -m tools.chaos node --redis URL --service S --configs N --ledger PATH \\
        [--control FILE] [--hb 0.05 --ttl 0.6 ...]
    python -m tools.chaos node --redis URL --service S --config-file FILE --ledger PATH \\
        --settings JSON [--managers K] [--wait] [--commands] [--trace]

Each process hosts ``--managers`` managers (default 1) of one service. ``get_config``
returns ``[{"id": 0}, ..., {"id": N-1}]`` (``--configs N``) or the JSON list in a file
that is re-read on every call (``--config-file``: a benchmark changes its configs by
rewriting it; a config's ``"v"`` is its content version and goes into the ledger).
``create`` and ``disconnect`` write the ledger (:mod:`tools.chaos.ledger`); the control
file (:mod:`tools.chaos.control`) injects faults into every callback.

The settings are the timing flags (``--hb``, ``--ttl``, ...: fast defaults for tests and
chaos) or, instead of them, ``--settings`` (``dim.Settings`` keyword arguments as JSON,
dim's defaults for the rest: what the benchmarks measure).

Ledger lines, besides ``create``/``disconnect``: ``loaded`` (imports done, before any
manager starts), ``ready`` and ``stopped`` per manager, ``event`` for the dim events
that explain faults, and those the control file asks for. ``READY <node id>`` is
printed on stdout once a manager has started.

Commands on standard input (with ``--commands``; ``--wait`` implies it), one per line:
``start`` (start the managers; with ``--wait`` nothing starts before it), ``leave I``
(stop manager I gracefully), ``stop`` (stop everything and exit). End of input means
``stop``. SIGTERM and SIGINT stop every manager gracefully and exit 0; SIGUSR1 dumps
every thread's stack to stderr.
"""

from __future__ import annotations

import argparse
import faulthandler
import itertools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from dim import Event, EventType, Manager, Settings
from tools.chaos.control import Control, ControlledError, set_wall_offset
from tools.chaos.ledger import LedgerFile, Record

__all__ = ["node_main"]

log = logging.getLogger(__name__)

#: The timing flags: argparse dest -> (the ``dim.Settings`` field, its default here).
#: Fast, for tests and chaos runs; ``--settings`` replaces them all.
TIMING_FLAGS: dict[str, tuple[str, float]] = {
    "hb": ("heartbeat_interval", 0.05),
    "ttl": ("node_ttl", 0.6),
    "config_interval": ("config_interval", 0.2),
    "healthcheck_interval": ("healthcheck_interval", 1.0),
    "healthcheck_timeout": ("healthcheck_timeout", 0.5),
    "failure_cooldown": ("failure_cooldown", 1.0),
    "create_attempts": ("create_attempts", 3),
    "disconnect_timeout": ("disconnect_timeout", 2.0),
    "create_timeout": ("create_timeout", 1.0),
    "config_timeout": ("config_timeout", 10.0),
    "max_workers": ("max_workers", 8),
    "connect_timeout": ("connect_timeout", 5.0),
}

#: The events written to the ledger (``ev: "event"``): those that explain faults.
LEDGER_EVENTS: tuple[EventType, ...] = (
    EventType.FENCED,
    EventType.LEASE_LOST,
    EventType.LEADERSHIP_GAINED,
    EventType.LEADERSHIP_LOST,
    EventType.REDIS_LOST,
    EventType.REDIS_RESTORED,
    EventType.LOOP_ERROR,
    EventType.INSTANCE_FAILED,
    EventType.INSTANCE_UNHEALTHY,
    EventType.CONFIG_ERROR,
    # recorded once dim has them: a disconnect that overran disconnect_timeout, and
    # Redis data lost or rewound (a reset window opened)
    *[
        t
        for t in (
            getattr(EventType, "DISCONNECT_TIMEOUT", None),
            getattr(EventType, "REDIS_RESET", None),
        )
        if t is not None
    ],
)

STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _node_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.chaos node",
        description="dim managers that write their instances' lifecycle to a ledger.",
    )
    p.add_argument("--redis", default=None, help="redis:// URL (or --sentinel)")
    p.add_argument(
        "--sentinel",
        default=None,
        help="host:port[,host:port...] of Sentinels: reach the master through them",
    )
    p.add_argument("--sentinel-master", default="dimmaster", help="the master's name")
    p.add_argument("--service", required=True)
    configs = p.add_mutually_exclusive_group(required=True)
    configs.add_argument("--configs", type=int, help="number of configs (ids 0..N-1)")
    configs.add_argument(
        "--config-file", help="JSON list of configs, re-read on every get_config call"
    )
    p.add_argument("--ledger", required=True, help="JSON-lines file to append to")
    p.add_argument("--control", default=None, help="JSON control file (enables healthcheck)")
    p.add_argument("--hb", type=float, default=None, help="heartbeat_interval (0.05)")
    p.add_argument("--ttl", type=float, default=None, help="node_ttl, the claim TTL (0.6)")
    p.add_argument("--leader-ttl", type=float, default=None, help="leader_ttl (--ttl)")
    p.add_argument("--config-interval", type=float, default=None, help="(0.2)")
    p.add_argument("--healthcheck-interval", type=float, default=None, help="(1.0)")
    p.add_argument("--healthcheck-timeout", type=float, default=None, help="(0.5)")
    p.add_argument("--failure-cooldown", type=float, default=None, help="(1.0)")
    p.add_argument("--create-attempts", type=int, default=None, help="(3)")
    p.add_argument("--disconnect-timeout", type=float, default=None, help="(2.0)")
    p.add_argument("--create-timeout", type=float, default=None, help="(1.0)")
    p.add_argument("--config-timeout", type=float, default=None, help="config_timeout (10)")
    p.add_argument(
        "--max-workers", type=int, default=None, help="create/disconnect calls at once (8)"
    )
    p.add_argument("--connect-timeout", type=float, default=None, help="(5.0)")
    p.add_argument(
        "--settings",
        default=None,
        help="dim.Settings keyword arguments as JSON, instead of the timing flags (dim's "
        "defaults for the rest)",
    )
    p.add_argument("--weight", type=float, default=1.0, help="the node's weight")
    p.add_argument("--managers", type=int, default=1, help="managers in this process")
    p.add_argument("--node-name", default=None, help="a static node name (one manager)")
    p.add_argument("--wait", action="store_true", help="start only on a 'start' command")
    p.add_argument("--commands", action="store_true", help="read commands from stdin")
    p.add_argument(
        "--healthcheck", action="store_true", help="a trivial healthcheck (without --control)"
    )
    p.add_argument(
        "--log-healthchecks",
        action="store_true",
        help='write a "healthcheck" ledger line per healthcheck call',
    )
    p.add_argument(
        "--trace", action="store_true", help="ledger a 'trace' record per Redis call and hint"
    )
    p.add_argument("--log-level", default="WARNING")
    return p


def node_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Settings:
    """The managers' settings: ``--settings``, or the timing flags over their defaults."""
    given = {
        field: getattr(args, dest)
        for dest, (field, _) in TIMING_FLAGS.items()
        if getattr(args, dest) is not None
    }
    if args.leader_ttl is not None:
        given["leader_ttl"] = args.leader_ttl
    if args.settings is not None:
        if given:
            parser.error(f"--settings replaces the timing flags; drop {sorted(given)}")
        return Settings(**json.loads(args.settings))
    values: dict[str, Any] = {field: default for field, default in TIMING_FLAGS.values()}
    values.update(given)
    values.setdefault("leader_ttl", values["node_ttl"])
    return Settings(create_backoff=0.01, create_backoff_max=0.05, **values)


def install_trace(ledger: LedgerFile) -> None:
    """Wrap dim's Redis calls and hint handling to ledger when each ran (for profiling)."""
    from dim import listener, store

    def wrap(cls: Any, name: str) -> None:
        original = getattr(cls, name)

        def traced(self: Any, *a: Any, **kw: Any) -> Any:
            started = time.monotonic()
            try:
                return original(self, *a, **kw)
            finally:
                extra = {}
                if name == "handle":
                    extra["data"] = str(a[0])[:80]
                    extra["node"] = self.node.node_id
                elif a and isinstance(a[0], str):
                    extra["node"] = a[0]
                ledger.write(
                    ev="trace", what=name, start=started, dur=time.monotonic() - started, **extra
                )

        setattr(cls, name, traced)

    for name in (
        "heartbeat",
        "claim",
        "settle",
        "release",
        "read_desired",
        "publish",
        "members",
        "node_infos",
        "leader_write",
        "leave",
        "resign",
        "claims",
        "failures",
        "leader_read",
    ):
        wrap(store.Store, name)
    wrap(listener.HintListener, "handle")


class _Instance:
    """A fake long-lived instance that remembers its config and lease token."""

    __slots__ = ("config_id", "node", "serial", "token", "version")

    def __init__(
        self,
        serial: int,
        node: Optional[str],
        config_id: Any,
        token: Optional[int],
        version: Any = None,
    ) -> None:
        self.serial = serial
        self.node = node
        self.config_id = config_id
        self.token = token
        self.version = version


class _Member:
    """One manager of this process, and what its callbacks need to know about it."""

    def __init__(self) -> None:
        self.manager: Optional[Manager] = None
        self.node_id: Optional[str] = None  # set once start() has returned
        self.started = threading.Event()  # start() has returned (see NodeProgram.create)
        self.stopping = threading.Event()  # set just before manager.stop()

    @property
    def live(self) -> Manager:
        assert self.manager is not None
        return self.manager


class NodeProgram:
    """The managers of one node process, their callbacks, and their ledger lines."""

    def __init__(self, args: argparse.Namespace, settings: Settings) -> None:
        self.args = args
        self.settings = settings
        self.ledger = LedgerFile(args.ledger)
        self.control = Control(args.control)
        self.config_file = None if args.config_file is None else Path(args.config_file)
        self._serials = itertools.count(1)
        self._serial_lock = threading.Lock()
        self._lock = threading.Lock()  # starts, leaves and the final stop, one at a time
        self.done = threading.Event()  # stop everything and exit
        self.members = [self._make_member() for _ in range(args.managers)]

    # the managers

    def _redis_target(self) -> Any:
        if not self.args.sentinel:
            return self.args.redis
        from redis.sentinel import Sentinel

        hosts = []
        for item in str(self.args.sentinel).split(","):
            host, _, port = item.strip().rpartition(":")
            hosts.append((host or "127.0.0.1", int(port)))
        timeout = self.settings.socket_timeout
        sentinel = Sentinel(hosts, socket_timeout=1.0, socket_connect_timeout=1.0)
        return sentinel.master_for(
            self.args.sentinel_master, socket_timeout=timeout, socket_connect_timeout=timeout
        )

    def _make_member(self) -> _Member:
        member = _Member()
        checking = bool(self.args.control) or self.args.healthcheck
        manager = Manager(
            get_config=lambda: self.get_config(member),
            create=lambda config: self.create(member, config),
            disconnect=self.disconnect,
            healthcheck=self.healthcheck if checking else None,
            redis=self._redis_target(),
            service=self.args.service,
            settings=self.settings,
            weight=self.args.weight,
            node_name=self.args.node_name,
        )
        manager.add_listener(self.on_event, *LEDGER_EVENTS)
        member.manager = manager
        return member

    def start_all(self) -> None:
        """Start every manager not started yet (unless the process is stopping)."""
        with self._lock:
            for member in self.members:
                if self.done.is_set():
                    return
                if member.started.is_set():
                    continue
                manager = member.live
                manager.start()
                member.node_id = manager.node_id
                member.started.set()
                self.ledger.write(node=member.node_id, ev="ready")
                sys.stdout.write(f"READY {member.node_id}\n")
                sys.stdout.flush()

    def _stop(self, member: _Member) -> None:
        manager = member.live
        node = manager.node_id
        if node is None:
            return
        member.stopping.set()
        began = time.process_time_ns()
        manager.stop()
        # the CPU the stop took, every thread of the process (those it ended too): the
        # benchmarks charge a leave with it
        self.ledger.write(node=node, ev="stopped", cpu_ns=time.process_time_ns() - began)

    def leave(self, index: int) -> None:
        """Stop one manager gracefully (the ``leave I`` command)."""
        with self._lock:
            self._stop(self.members[index])

    def stop_all(self) -> None:
        with self._lock:
            for member in self.members:
                self._stop(member)

    # the callbacks

    def get_config(self, member: _Member) -> list[Any]:
        control = self.control
        current = control.current()
        hang = control.rule("get_config_hang", None)
        seconds = float(hang.get("seconds", 1.0)) if hang is not None else 0.0
        if hang is not None or current.get("log_get_config"):
            self.ledger.write(node=member.node_id, ev="get_config", hang=seconds)
        if hang is not None:
            threading.Event().wait(seconds)
            self.ledger.write(node=member.node_id, ev="get_config_return", hang=seconds)
        exc = control.raising("get_config")
        if exc is not None:
            self.ledger.write(node=member.node_id, ev="get_config_raise", exc=type(exc).__name__)
            raise exc
        if current.get("get_config_error"):
            raise ControlledError("get_config fails (control file)")
        count = current.get("configs")
        if isinstance(count, int) and not isinstance(count, bool):
            return [{"id": i} for i in range(count)]
        if self.config_file is not None:
            configs: list[Any] = json.loads(self.config_file.read_text())
            return configs
        return [{"id": i} for i in range(self.args.configs)]

    def create(self, member: _Member, config: Record) -> _Instance:
        manager = member.live
        ledger, control = self.ledger, self.control
        # Manager.start() publishes its node only after the loops run, so a create that
        # races start() sees no node id and no lease yet: wait for start() to return
        # (and record that it happened, "early").
        # Likewise Manager.stop() forgets its node first, so a create that runs while the
        # manager stops sees no node and no lease either ("during_stop").
        early = manager.node_id is None
        during_stop = member.stopping.is_set()
        if early and not during_stop:
            member.started.wait(10.0)
        lease = manager.lease(config["id"])
        token = lease.token if lease is not None else None
        node = manager.node_id or member.node_id
        if control.rule("create_fail", config["id"]) is not None:
            ledger.write(node=node, id=config["id"], ev="create_error", token=token)
            raise ControlledError(f"create of {config['id']} fails (control file)")
        exc = control.raising("create", config["id"])
        if exc is not None:
            ledger.write(
                node=node,
                id=config["id"],
                ev="create_error",
                token=token,
                raised=type(exc).__name__,
            )
            raise exc
        with self._serial_lock:
            serial = next(self._serials)
        delay = control.rule("create_delay", config["id"])
        version = config.get("v")
        ledger.write(
            node=node,
            id=config["id"],
            ev="create",
            token=token,
            inst=serial,
            early=early,
            during_stop=during_stop,
            **({} if version is None else {"v": version}),
            **({} if delay is None else {"delay": float(delay.get("seconds", 1.0))}),
        )
        if delay is not None:
            threading.Event().wait(float(delay.get("seconds", 1.0)))
            ledger.write(node=node, id=config["id"], ev="created", token=token, inst=serial)
        return _Instance(serial, node, config["id"], token, version)

    def disconnect(self, instance: _Instance) -> None:
        ledger, control = self.ledger, self.control
        delay = control.rule("disconnect_delay", instance.config_id)
        exc = control.raising("disconnect", instance.config_id)
        if delay is not None or exc is not None:
            ledger.write(
                node=instance.node,
                id=instance.config_id,
                ev="disconnecting",
                token=instance.token,
                inst=instance.serial,
                seconds=float(delay.get("seconds", 1.0)) if delay is not None else 0.0,
            )
        if delay is not None:
            threading.Event().wait(float(delay.get("seconds", 1.0)))
        ledger.write(
            node=instance.node,
            id=instance.config_id,
            ev="disconnect",
            token=instance.token,
            inst=instance.serial,
            **({} if instance.version is None else {"v": instance.version}),
            **({} if exc is None else {"raised": type(exc).__name__}),
        )
        if exc is not None:
            raise exc

    def healthcheck(self, instance: _Instance) -> bool:
        ledger, control = self.ledger, self.control
        if self.args.log_healthchecks:
            ledger.write(
                node=instance.node,
                id=instance.config_id,
                ev="healthcheck",
                token=instance.token,
                inst=instance.serial,
            )
        hang = control.rule("healthcheck_hang", instance.config_id)
        if hang is not None:
            threading.Event().wait(float(hang.get("seconds", 1.0)))
            return True
        exc = control.raising("healthcheck", instance.config_id)
        if exc is not None:
            ledger.write(
                node=instance.node,
                id=instance.config_id,
                ev="healthcheck_raise",
                token=instance.token,
                inst=instance.serial,
                exc=type(exc).__name__,
            )
            raise exc
        return control.rule("unhealthy", instance.config_id) is None

    def on_event(self, event: Event) -> None:
        extra: Record = {}
        if event.error is not None:
            extra["error"] = repr(event.error)[:300]
        self.ledger.write(
            node=event.node_id,
            ev="event",
            type=event.type.value,
            id=event.config_id,
            token=event.token,
            **extra,
        )

    # threads of the program itself

    def follow_wall_offset(self) -> None:
        """Apply the control file's ``wall_offset`` within ~50 ms of a change."""
        applied = 0.0
        while not self.done.wait(0.05):
            offset = self.control.wall_offset()
            if offset != applied:
                set_wall_offset(offset)
                applied = offset
                node = self.members[0].node_id
                self.ledger.write(node=node, ev="wall_offset", offset=applied)

    def read_commands(self) -> None:
        """Obey ``start``, ``leave I`` and ``stop`` on stdin; end of input means stop."""
        try:
            for line in sys.stdin:
                words = line.split()
                if not words:
                    continue
                if words[0] == "start":
                    self.start_all()
                elif words[0] == "leave":
                    self.leave(int(words[1]))
                elif words[0] == "stop":
                    break
        finally:
            self.done.set()


def node_main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the node until SIGTERM/SIGINT (or ``stop``), stop it gracefully, return 0.

    ``create`` lines also say whether the call raced ``start()`` (``"early"``) or came
    while the manager was stopping (``"during_stop"``). What the control file can change
    is listed in :func:`tools.chaos.control.write_control`.
    """
    parser = _node_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.redis is None and args.sentinel is None:
        parser.error("give --redis or --sentinel")
    if args.node_name is not None and args.managers != 1:
        parser.error("--node-name names one manager: use it with --managers 1")
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
        format=f"%(asctime)s pid={os.getpid()} %(threadName)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    program = NodeProgram(args, node_settings(args, parser))
    if args.trace:
        install_trace(program.ledger)

    def on_signal(signum: int, frame: Any) -> None:
        program.done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # kill -USR1 <pid> dumps every thread's stack to stderr (for a hung stop)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # A process-directed signal goes to any thread that does not block it, and one taken
    # by another thread does not interrupt the main thread's Event.wait(), which would
    # then never return. So block the signals while the threads start (they inherit the
    # mask, and so do the threads dim starts from them), then unblock them in this
    # thread only.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    if args.control:
        threading.Thread(target=program.follow_wall_offset, name="wall-offset", daemon=True).start()
    program.ledger.write(ev="loaded")
    if args.commands or args.wait:
        threading.Thread(target=program.read_commands, name="node-commands", daemon=True).start()
    if not args.wait:
        program.start_all()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    program.done.wait()

    program.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(node_main())
