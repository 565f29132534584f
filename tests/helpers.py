"""Building blocks for the integration tests: a ledger of instance lifetimes and a
cluster of in-process managers with fast settings.

The ledger is the shared one of :mod:`tools.chaos.ledger` (the node processes of the
process tests, the chaos run and the benchmarks write the same records to files).
"""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
import threading
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Optional

import redis

from dim import Manager, Settings
from dim.keys import Keys
from dim.messages import Kind, Message, decode
from dim.store import Store
from dim.testing import wait_until
from tools.chaos.ledger import Interval, MemoryLedger, overlaps

ROOT = Path(__file__).resolve().parent.parent

# Short TTLs keep the suite fast; a stall of several heartbeats on a loaded machine
# makes nodes fence themselves, which the tests tolerate (they check invariants).
FAST = Settings(
    heartbeat_interval=0.05,
    node_ttl=0.6,
    leader_ttl=0.6,
    healthcheck_interval=0.1,
    healthcheck_timeout=0.5,
    config_interval=0.2,
    create_backoff=0.01,
    create_backoff_max=0.05,
    failure_cooldown=1.0,
    # the leases follow from these: a crashed node's claims live 1.6 s, a reset window
    # (a private Redis that just started) 2.2 s
    create_timeout=1.0,
    disconnect_timeout=1.0,
    connect_timeout=2.0,
)


class Instance:
    """A fake long-lived instance that knows its config and whether it is closed."""

    def __init__(self, node: str, config: Any) -> None:
        self.node = node
        self.config = config
        self.closed = False
        self.healthy = True

    def __repr__(self) -> str:
        return f"<Instance {self.config!r} on {self.node}>"


class Ledger(MemoryLedger):
    """The instances of an in-process cluster, on the shared ledger (:mod:`tools.chaos.ledger`).

    :meth:`open` writes the ``create`` record when ``create`` is *called*, :meth:`close`
    the ``disconnect`` record when ``disconnect`` *returns* (or a failing ``create``
    gave up): each interval is the widest window in which its instance could act. The
    same records and the same overlap check as the node processes' file ledgers.
    """

    def __init__(self) -> None:
        super().__init__()
        self._serials = itertools.count(1)
        self._serial_lock = threading.Lock()

    def open(self, node: str, config_id: Any) -> int:
        """Record a ``create`` call; returns the instance's serial, for :meth:`close`."""
        with self._serial_lock:
            serial = next(self._serials)
        self.write(ev="create", node=node, id=config_id, inst=serial)
        return serial

    def close(self, serial: int, config_id: Any, node: str) -> None:
        """Record that the instance ``serial`` is gone (its ``disconnect`` returned)."""
        self.write(ev="disconnect", node=node, id=config_id, inst=serial)

    def intervals(self, config_id: Any = None) -> list[Interval]:
        """Every instance so far (of one config, if given), open ones with ``end`` None."""
        found = self.view().intervals
        return [iv for iv in found if config_id is None or iv.cid == config_id]

    def overlaps(self) -> list[tuple[Interval, Interval]]:
        """Pairs of instances of one config alive at the same time, on any nodes."""
        return overlaps(self.view().intervals)

    def create_count(self, node: Optional[str] = None) -> int:
        return sum(1 for iv in self.intervals() if node is None or iv.node == node)

    def disconnect_count(self) -> int:
        return sum(1 for iv in self.intervals() if iv.end is not None)


class Cluster:
    """Several managers of one service in this process, sharing one ledger."""

    def __init__(
        self,
        redis_url: str,
        service: str,
        configs: list[Any],
        settings: Settings = FAST,
        create: Optional[Callable[[str, Any], Any]] = None,
        healthcheck: Optional[Callable[[Any], Any]] = None,
        disconnect: Optional[Callable[[str, Any], Any]] = None,
        **manager_kwargs: Any,
    ) -> None:
        self.redis_url = redis_url
        self.service = service
        self.configs = list(configs)
        self.settings = settings
        self.ledger = Ledger()
        self.managers: list[Manager] = []
        self._create_hook = create
        self._disconnect_hook = disconnect  # called (node, instance) before the record
        self._healthcheck = healthcheck
        self._kwargs = manager_kwargs
        self._serials: dict[int, int] = {}  # id(instance) -> its serial in the ledger

    def get_config(self) -> list[Any]:
        return list(self.configs)

    def make(self, **kwargs: Any) -> Manager:
        """A new (not started) manager wired to the ledger."""
        box: dict[str, Manager] = {}

        def create(config: Any) -> Instance:
            manager = box["m"]
            node = manager.node_id or "?"
            config_id = config["id"] if isinstance(config, dict) else config
            serial = self.ledger.open(node, config_id)
            try:
                if self._create_hook is not None:
                    self._create_hook(node, config)
            except BaseException:
                self.ledger.close(serial, config_id, node)
                raise
            instance = Instance(node, config)
            self._serials[id(instance)] = serial
            return instance

        def disconnect(instance: Instance) -> None:
            if self._disconnect_hook is not None:
                self._disconnect_hook(instance.node, instance)
            instance.closed = True
            config_id = (
                instance.config["id"] if isinstance(instance.config, dict) else instance.config
            )
            self.ledger.close(self._serials[id(instance)], config_id, instance.node)

        options = dict(self._kwargs)
        options.update(kwargs)
        options.setdefault("settings", self.settings)
        if self._healthcheck is not None:
            options.setdefault("healthcheck", self._healthcheck)
        manager = Manager(
            get_config=self.get_config,
            create=create,
            disconnect=disconnect,
            redis=self.redis_url,
            service=self.service,
            **options,
        )
        box["m"] = manager
        return manager

    def add(self, n: int = 1, **kwargs: Any) -> list[Manager]:
        started = [self.make(**kwargs).start() for _ in range(n)]
        self.managers.extend(started)
        return started

    def running(self) -> list[Manager]:
        return [m for m in self.managers if m.node_id is not None]

    def placement(self) -> dict[Any, list[str]]:
        """config id -> nodes whose manager reports the instance running now."""
        out: dict[Any, list[str]] = defaultdict(list)
        for m in self.running():
            for config_id in m.instances:
                out[config_id].append(m.node_id or "?")
        return dict(out)

    def settled(self) -> bool:
        """Every config runs exactly once and every node is stable."""
        ids = {c["id"] if isinstance(c, dict) else c for c in self.configs}
        placement = self.placement()
        if set(placement) != ids or any(len(v) != 1 for v in placement.values()):
            return False
        return all(m.wait_until_stable(0) for m in self.running())

    def wait_settled(self, timeout: float = 15.0) -> None:
        wait_until(
            self.settled,
            timeout,
            interval=0.02,
            message=f"cluster did not settle: {self.placement()}",
        )

    def balanced(self) -> bool:
        """Settled, with the configs spread evenly: the counts differ by at most one."""
        counts = self.counts()
        return bool(counts) and max(counts) - min(counts) <= 1 and self.settled()

    def wait_balanced(self, timeout: float = 15.0) -> None:
        """Wait until :meth:`balanced`: after several nodes start together, or paced moves.

        A new service on a server up for longer than its reset window starts at once, so
        the first node may place every config before the others join; until the leader's
        next rebalance the cluster is settled (each config once, each node running what
        it is assigned) but not spread. So are the pauses between two batches of paced
        moves. Only for clusters whose fair shares are equal (no weights, rules, drains).
        """
        wait_until(
            self.balanced,
            timeout,
            interval=0.02,
            message=f"cluster did not settle evenly: {self.placement()}",
        )

    def counts(self) -> list[int]:
        return sorted(len(m.instances) for m in self.running())

    def stop(self) -> None:
        for m in self.managers:
            m.stop()


class HintRecorder:
    """Every dim hint published on one service's channel or a node's inbox, decoded, in
    order (``inboxes`` holds the node each went to, None for the shared channel)."""

    def __init__(self, pubsub: Any, channel: str) -> None:
        self.pubsub = pubsub
        self.channel = channel
        # an inbox no node listens on: what mark() publishes to know the thread caught up
        self.marker = channel + ":test-mark"
        self.pubsub.psubscribe(channel + "*")
        self.messages: list[Message] = []
        self.inboxes: list[Optional[str]] = []
        self.marks: set[bytes] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="test-hints", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            raw = self.pubsub.get_message(timeout=0.05)
            if raw is not None:
                channel = raw["channel"]
                channel = channel.decode() if isinstance(channel, bytes) else channel
                with self.lock:
                    if channel == self.marker:
                        self.marks.add(raw["data"])
                        continue
                    self.messages.append(decode(raw["data"]))
                    self.inboxes.append(
                        channel[len(self.channel) + 1 :] if channel != self.channel else None
                    )

    def mark(self) -> int:
        """Where the hints published from now on begin: every hint published before the
        call has been recorded (the recorder reads on a thread of its own)."""
        token = uuid.uuid4().hex.encode()
        publisher = redis.Redis(connection_pool=self.pubsub.connection_pool)
        publisher.publish(self.marker, token)
        wait_until(lambda: token in self.marks, 5, message="the hint recorder fell behind")
        with self.lock:
            return len(self.messages)

    def of(self, kind: Kind, start: int = 0) -> list[Message]:
        with self.lock:
            return [m for m in self.messages[start:] if m.kind is kind]

    def sent(self, kind: Kind, start: int = 0) -> list[tuple[Optional[str], Message]]:
        """(the inbox it went to, or None for every node's channel; the hint)."""
        with self.lock:
            pairs = zip(self.inboxes[start:], self.messages[start:])
            return [(to, m) for to, m in pairs if m.kind is kind]

    def heard(self, kind: Kind, node: Any) -> bool:
        return any(m.node == node for m in self.of(kind))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.pubsub.close()


def id_manager(
    redis_url: str,
    service: str,
    configs: list[dict[str, Any]],
    settings: Settings,
    disconnect: Callable[[Any], Any],
) -> Manager:
    """A manager of ``configs`` (read anew at every ``get_config``, so the test may change
    the list) whose instance of a config is its id."""
    return Manager(
        get_config=lambda: list(configs),
        create=lambda config: config["id"],
        disconnect=disconnect,
        redis=redis_url,
        service=service,
        settings=settings,
    )


def dim_env(**extra: str) -> dict[str, str]:
    """The environment for ``python -m dim``: this checkout first, no DIM_* leaking in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIM_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def run_dim(
    *args: str, env: Optional[dict[str, str]] = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """``python -m dim ...`` from this checkout, in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "dim", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env if env is not None else dim_env(),
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The command failed with ``code`` and exactly one line on stderr, no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def comes_true(predicate: Callable[[], object], timeout: float) -> bool:
    """Whether ``predicate`` holds within ``timeout`` (for a test that reports more than
    a timeout when it does not)."""
    try:
        wait_until(predicate, timeout)
    except TimeoutError:
        return False
    return True


class Quiet(logging.Handler):
    """A handler that writes nothing (a NullHandler never runs its filters)."""

    def emit(self, record: logging.LogRecord) -> None:
        pass


class RaiseOnceOn(logging.Filter):
    """A log filter with a bug: it raises, once, on a line that contains ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.raised = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if self.text in str(record.msg) and not self.raised:
            self.raised += 1
            raise RuntimeError("log filter bug")
        return True


def slow_heartbeats(redis_client: redis.Redis, service: str) -> Any:
    """Settings whose heartbeat comes after the test (a 6 s interval): whatever the
    test sees was woken by a hint. Sets the fence and the era, so no reset window."""
    no_reset_window(redis_client, Keys(service))
    return FAST.replace(heartbeat_interval=6.0, node_ttl=20.0, leader_ttl=20.0, config_interval=600)


def no_reset_window(redis_client: redis.Redis, keys: Keys) -> int:
    """Set the service's fence and era as a live cluster would have them, so nodes that
    start now open no reset window (a new service otherwise waits one out); returns the
    fence value (the server's time in microseconds, as a real epoch would be)."""
    seconds, micros = redis_client.time()
    fence = seconds * 1_000_000 + micros
    redis_client.set(keys.fence, fence)
    redis_client.set(keys.era, redis_client.info("server")["run_id"])
    return fence


def leading(redis_client: redis.Redis, service: str, value: str = "n0:5") -> Store:
    """A store whose writes pass the leader check as ``value`` (no reset window)."""
    no_reset_window(redis_client, Keys(service))
    redis_client.set(Keys(service).leader, value)
    return Store(redis_client, service)
