"""A tooz partitioner node process for ``versus_tooz.py`` (not a benchmark itself).

Runs with an interpreter that has tooz (``pip install tooz``; see ``versus_tooz.py``);
needs nothing of dim. Same ledger and stdin commands as the dim node (``python -m
tools.chaos node --commands``).

This is how the tooz documentation has a partitioner used: join a partitioned group, and
on every poll run the watchers (membership changes update the hash ring) and own exactly
the objects ``belongs_to_self`` says. The poll also sends the heartbeat (tooz's own
heart thread beats only every ``membership_timeout``, which lets the membership lapse),
so both systems poll Redis at the same interval.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Optional

# The repository, for the shared ledger. Not through _harness like the benchmark scripts:
# this runs in tooz's interpreter, where neither dim nor the harness's imports exist
# (tools.chaos.ledger needs the standard library only).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.chaos.ledger import LedgerFile

STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
GROUP = b"bench"


def main(argv: Optional[list[str]] = None) -> int:
    from tooz import coordination

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--redis", required=True, help="redis://host:port")
    p.add_argument("--service", required=True, help="tooz namespace")
    p.add_argument("--configs", required=True)
    p.add_argument("--ledger", required=True)
    p.add_argument("--poll", type=float, default=0.1, help="heartbeat + watcher interval")
    p.add_argument("--ttl", type=float, default=1.0, help="membership_timeout")
    p.add_argument("--wait", action="store_true")
    args = p.parse_args(argv)

    ledger = LedgerFile(args.ledger)
    configs = json.loads(Path(args.configs).read_text())
    member = f"{args.service}-{uuid.uuid4().hex[:8]}".encode()
    url = f"{args.redis}?timeout=5&membership_timeout={args.ttl}&namespace=tooz-{args.service}"
    go = threading.Event()
    done = threading.Event()
    running: dict[Any, tuple[int, Any]] = {}
    serial = [0]

    def commands() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        if not args.wait:
            go.set()
        for line in sys.stdin:
            word = line.strip()
            if word == "start":
                go.set()
            elif word == "stop":
                break
        done.set()
        go.set()

    def apply(part: Any, node: str) -> None:
        for config in configs:
            cid = config["id"]
            mine = part.belongs_to_self(str(cid))
            if mine and cid not in running:
                serial[0] += 1
                running[cid] = (serial[0], config.get("v", 0))
                ledger.write(ev="create", node=node, id=cid, v=config.get("v", 0), inst=serial[0])
            elif not mine and cid in running:
                number, version = running.pop(cid)
                ledger.write(ev="disconnect", node=node, id=cid, v=version, inst=number)

    signal.signal(signal.SIGTERM, lambda *_: (done.set(), go.set()))
    signal.signal(signal.SIGINT, lambda *_: (done.set(), go.set()))
    ledger.write(ev="loaded")
    threading.Thread(target=commands, name="bench-commands", daemon=True).start()
    go.wait()
    if done.is_set():
        return 0
    node = member.decode()
    coord = coordination.get_coordinator(url, member)
    coord.start(start_heart=False)
    try:
        coord.create_group(GROUP).get()
    except coordination.GroupAlreadyExist:
        pass
    part = coord.join_partitioned_group(GROUP)
    ledger.write(ev="ready", node=node)
    seen: Optional[list[str]] = None
    while not done.is_set():
        coord.heartbeat()
        coord.run_watchers()
        apply(part, node)
        members = sorted(m.decode() for m in part.ring.nodes)
        if members != seen:
            seen = members
            ledger.write(ev="view", node=node, members=members)
        done.wait(args.poll)
    # graceful: stop the instances, then leave, as a tooz user would
    for cid, (number, version) in sorted(running.items(), key=lambda kv: str(kv[0])):
        ledger.write(ev="disconnect", node=node, id=cid, v=version, inst=number)
    running.clear()
    try:
        coord.leave_group(GROUP).get()
    finally:
        coord.stop()
    ledger.write(ev="stopped", node=node)
    return 0


if __name__ == "__main__":
    sys.exit(main())
