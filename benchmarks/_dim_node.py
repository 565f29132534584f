"""A dim node process for the benchmarks (not a benchmark itself).

Run by the benchmark harness as::

    python benchmarks/_dim_node.py --redis URL --service S --configs FILE --ledger FILE \
        [--settings JSON] [--managers K] [--wait] [--healthcheck]

It hosts ``K`` managers (default 1) whose ``get_config`` reads the JSON list in FILE
(so the benchmark can change the configs by rewriting it), and appends ``ready``,
``create``, ``disconnect`` and ``stopped`` records to the ledger (see ``_ledger.py``).

Commands on standard input, one per line: ``start`` (start the managers; with
``--wait`` nothing starts before it), ``leave I`` (stop manager I gracefully), ``stop``
(stop everything gracefully and exit). SIGTERM and end of input mean ``stop``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._ledger import LedgerFile
from dim import Manager, Settings

STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class Instance:
    """A fake long-lived instance."""

    __slots__ = ("config_id", "node", "serial", "version")

    def __init__(self, serial: int, node: Optional[str], config: Any) -> None:
        self.serial = serial
        self.node = node
        self.config_id = config["id"]
        self.version = config.get("v", 0)


def install_trace(ledger: LedgerFile) -> None:
    """Wrap dim's Redis calls and hint handling to ledger when each ran (for profiling)."""
    import time

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
    wrap(listener.Listener, "handle")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--redis", required=True)
    p.add_argument("--service", required=True)
    p.add_argument("--configs", required=True, help="JSON file with the list of configs")
    p.add_argument("--ledger", required=True)
    p.add_argument("--settings", default="{}", help="dim.Settings keyword arguments, as JSON")
    p.add_argument("--managers", type=int, default=1)
    p.add_argument("--wait", action="store_true", help="start only on a 'start' command")
    p.add_argument("--healthcheck", action="store_true", help="install a trivial healthcheck")
    p.add_argument("--node-name", help="a static node name (with --managers 1)")
    p.add_argument(
        "--trace", action="store_true", help="ledger a 'trace' record per Redis call and hint"
    )
    args = p.parse_args(argv)

    settings = Settings(**json.loads(args.settings))
    ledger = LedgerFile(args.ledger)
    if args.trace:
        install_trace(ledger)
    configs_path = Path(args.configs)
    serial_lock = threading.Lock()
    serial = [0]

    def get_config() -> Any:
        return json.loads(configs_path.read_text())

    def make_manager() -> Manager:
        box: dict[str, Any] = {}

        def create(config: Any) -> Instance:
            with serial_lock:
                serial[0] += 1
                number = serial[0]
            node = box["m"].node_id
            ledger.write(ev="create", node=node, id=config["id"], v=config.get("v", 0), inst=number)
            return Instance(number, node, config)

        def disconnect(instance: Instance) -> None:
            ledger.write(
                ev="disconnect",
                node=instance.node,
                id=instance.config_id,
                v=instance.version,
                inst=instance.serial,
            )

        manager = Manager(
            get_config=get_config,
            create=create,
            disconnect=disconnect,
            healthcheck=(lambda instance: True) if args.healthcheck else None,
            redis=args.redis,
            service=args.service,
            settings=settings,
            node_name=args.node_name,
        )
        box["m"] = manager
        return manager

    managers = [make_manager() for _ in range(args.managers)]
    done = threading.Event()
    lock = threading.Lock()

    def start_all() -> None:
        with lock:
            for manager in managers:
                if done.is_set():
                    return
                manager.start()
                ledger.write(ev="ready", node=manager.node_id)

    def leave(index: int) -> None:
        with lock:
            manager = managers[index]
            node = manager.node_id
            manager.stop()
            ledger.write(ev="stopped", node=node)

    def commands() -> None:
        # dim's threads, started from here, inherit this mask: signals reach main only
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        if not args.wait:
            start_all()
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            if words[0] == "start":
                start_all()
            elif words[0] == "leave":
                leave(int(words[1]))
            elif words[0] == "stop":
                break
        done.set()

    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    ledger.write(ev="loaded")
    threading.Thread(target=commands, name="bench-commands", daemon=True).start()
    done.wait()
    with lock:
        for manager in managers:
            node = manager.node_id
            if node is not None:
                manager.stop()
                ledger.write(ev="stopped", node=node)
    return 0


if __name__ == "__main__":
    sys.exit(main())
