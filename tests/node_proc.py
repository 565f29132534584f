"""One dim node in its own process, for the multi-process fault tests.

Run from the repository root::

    python -m tests.node_proc --redis URL --service S --configs N --ledger PATH \
        [--hb 0.05 --ttl 0.6 --leader-ttl 0.6 --config-interval 0.2]

It starts a :class:`dim.Manager` with fast settings over ``[{"id": i} for i in range(N)]``
and appends one JSON line to the ledger per lifecycle event, each written with a single
``os.write`` on an ``O_APPEND`` descriptor (so lines from several processes never mix)::

    {"t": <time.monotonic()>, "pid": ..., "node": <node id>, "id": <config id>,
     "ev": "create" | "disconnect", "token": <lease token>, "inst": <serial in this pid>}

(``create`` lines also say whether the call raced ``start()`` ("early") or came while
the manager was stopping ("during_stop")), plus ``{"ev": "ready", ...}`` once the manager
has started, ``{"ev": "stopped", ...}`` after a graceful stop, and ``{"ev": "event",
"type": ...}`` for the dim events that explain faults (fenced, lease_lost, leadership,
redis_lost/restored, loop_error), written by a listener, so a little after the fact.
``time.monotonic()`` is system-wide on Linux, so times from different processes compare.
``READY <node id>`` is also printed on stdout.

SIGTERM (or SIGINT) stops the manager gracefully, then the process exits 0. SIGUSR1
dumps the stacks of all threads to stderr.
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
from typing import Any, Optional

from dim import Event, EventType, Manager, Settings


class LedgerFile:
    """Append-only JSON lines, one ``os.write`` per line."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.pid = os.getpid()

    def write(self, **fields: Any) -> None:
        record = {"t": time.monotonic(), "pid": self.pid}
        record.update(fields)
        os.write(self.fd, (json.dumps(record, sort_keys=True) + "\n").encode())


class Instance:
    """A fake long-lived instance that remembers its config and lease token."""

    def __init__(
        self, serial: int, node: Optional[str], config_id: Any, token: Optional[int]
    ) -> None:
        self.serial = serial
        self.node = node
        self.config_id = config_id
        self.token = token


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.node_proc", description=__doc__)
    p.add_argument("--redis", required=True, help="redis:// URL")
    p.add_argument("--service", required=True)
    p.add_argument("--configs", type=int, required=True, help="number of configs")
    p.add_argument("--ledger", required=True, help="JSON-lines file to append to")
    p.add_argument("--hb", type=float, default=0.05, help="heartbeat_interval")
    p.add_argument("--ttl", type=float, default=0.6, help="node_ttl (claim TTL)")
    p.add_argument("--leader-ttl", type=float, default=None, help="leader_ttl (default: --ttl)")
    p.add_argument("--config-interval", type=float, default=0.2)
    p.add_argument("--disconnect-timeout", type=float, default=2.0)
    p.add_argument("--connect-timeout", type=float, default=5.0)
    p.add_argument("--log-level", default="WARNING")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.WARNING),
        format=f"%(asctime)s pid={os.getpid()} %(threadName)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    settings = Settings(
        heartbeat_interval=args.hb,
        node_ttl=args.ttl,
        leader_ttl=args.leader_ttl if args.leader_ttl is not None else args.ttl,
        config_interval=args.config_interval,
        healthcheck_interval=1.0,
        healthcheck_timeout=0.5,
        create_backoff=0.01,
        create_backoff_max=0.05,
        failure_cooldown=1.0,
        disconnect_timeout=args.disconnect_timeout,
        connect_timeout=args.connect_timeout,
    )
    ledger = LedgerFile(args.ledger)
    configs = [{"id": i} for i in range(args.configs)]
    serials = itertools.count(1)
    serial_lock = threading.Lock()
    started = threading.Event()  # set once start() has returned (see create)
    stopping = threading.Event()  # set just before manager.stop()
    box: dict[str, Manager] = {}
    node_box: dict[str, Optional[str]] = {}

    def create(config: Any) -> Instance:
        manager = box["m"]
        # Manager.start() publishes its node only after the loops run, so a create that
        # races start() sees no node id and no lease yet: wait for start() to return
        # (and record that it happened, "early").
        # Likewise Manager.stop() forgets its node first, so a create that runs while the
        # manager stops sees no node and no lease either ("during_stop").
        early = manager.node_id is None
        during_stop = stopping.is_set()
        if early and not during_stop:
            started.wait(10.0)
        lease = manager.lease(config["id"])
        token = lease.token if lease is not None else None
        node = manager.node_id or node_box.get("id")
        with serial_lock:
            serial = next(serials)
        ledger.write(
            node=node,
            id=config["id"],
            ev="create",
            token=token,
            inst=serial,
            early=early,
            during_stop=during_stop,
        )
        return Instance(serial, node, config["id"], token)

    def disconnect(instance: Instance) -> None:
        ledger.write(
            node=instance.node,
            id=instance.config_id,
            ev="disconnect",
            token=instance.token,
            inst=instance.serial,
        )

    manager = Manager(
        get_config=lambda: list(configs),
        create=create,
        disconnect=disconnect,
        redis=args.redis,
        service=args.service,
        settings=settings,
    )
    box["m"] = manager

    def on_event(event: Event) -> None:
        ledger.write(
            node=event.node_id,
            ev="event",
            type=event.type.value,
            id=event.config_id,
            token=event.token,
        )

    manager.add_listener(
        on_event,
        EventType.FENCED,
        EventType.LEASE_LOST,
        EventType.LEADERSHIP_GAINED,
        EventType.LEADERSHIP_LOST,
        EventType.REDIS_LOST,
        EventType.REDIS_RESTORED,
        EventType.LOOP_ERROR,
    )

    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # kill -USR1 <pid> dumps every thread's stack to stderr (for a hung stop)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # A process-directed signal goes to any thread that does not block it, and one taken
    # by a dim thread does not interrupt the main thread's Event.wait(), which would then
    # never return. So block the signals while dim starts its threads (they inherit the
    # mask, and so do the threads they start), then unblock them in this thread only.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    manager.start()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
    node_id = manager.node_id
    node_box["id"] = node_id
    started.set()
    ledger.write(node=node_id, ev="ready")
    sys.stdout.write(f"READY {node_id}\n")
    sys.stdout.flush()

    stop.wait()

    stopping.set()
    manager.stop()
    ledger.write(node=node_id, ev="stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
