"""Capacity of one service on one Redis shard: thousands of simulated members against a
real leader.

Each cell (N nodes, M configs) runs on a fresh private redis-server:

1. **The leader** is a real :class:`dim.Manager` in a process of its own (this script
   with ``--leader-process``), started first so that it wins the leadership, at dim's
   default settings; its ``get_config`` returns the M configs ``{"id": i}``. It counts
   as one of the N nodes (it gets its share of configs and runs them). Its plan and
   write are timed from outside dim: the leader process wraps
   :func:`dim.plan.plan`, :meth:`dim.store.Store.leader_write` (the client's round trip,
   JSON encoding included), ``LeaderLoop._rebalance`` and the ``get_config`` + parse
   step, and writes one JSON line per call; Redis's ``SLOWLOG`` gives the time the
   ``LEADER_WRITE`` script itself held the server.
2. **The load generator** simulates the other N - 1 members in this process, on one
   thread. Each member is a :class:`dim.store.Store` of its own (its own
   :class:`dim.era.Era`, built as a Manager builds it), so its requests are built, and
   its replies decoded, by dim's own code: the generator captures the ``EVALSHA`` a
   store method would send (keys and arguments exactly as a node sends them), sends a
   few hundred of them in one pipeline, then hands each reply back to the same store
   method to decode. A member heartbeats every ``heartbeat_interval`` (the members'
   beats are spread evenly over the interval) with its real description and the claims
   it holds, reads its desired set (``READ_DESIRED``) when the version moves, claims
   (``CLAIM``) what it was given and releases (``RELEASE``) what it lost; a claimed
   config counts as created at once. Members never take the leadership (they send
   ``may_lead`` 0: a simulated member has no leader loop).
3. **Converged** means: every one of the M configs is assigned to a live node (the
   members' desired sets, read at the current version, plus the leader's own share add
   up to M and the ``assignment`` hash holds M entries), the placement is balanced
   (max load <= ceil(M / N)), and each config is claimed by its assignee (every member
   holds the claim of every config in its desired set; the leader reports as many
   instances running as it was given). With more than ``--claim-max`` configs the
   members do not claim (see below), and convergence is the assignment's alone.
4. Then a steady window: Redis commands and script calls per second (``INFO
   commandstats``), redis-server's and the leader's CPU (``/proc/<pid>/stat``), the
   generator's own CPU and lag, and ``used_memory``.

Why not claim a million configs: every heartbeat renews each claim its node holds
(``GET`` + ``PEXPIRE`` inside the script, protocol.rst section 2), so the heartbeat
load grows with M: one claim renewal per config per ``heartbeat_interval``. The cells
that claim measure that cost per renewal; the summary extrapolates it to the cells that
do not (and this generator, in Python, could not send a million renewals a second on
two cores either).

A member is *dropped* if the gap between two of its successful heartbeats exceeded
``node_ttl``: the generator fell behind. The generator's lag is how late each batch was
sent after it was due.

Usage::

    python benchmarks/capacity.py                       # the full grid (about 8 min)
    python benchmarks/capacity.py --quick               # tiny sizes, well under a minute
    python benchmarks/capacity.py --nodes 1000 --configs 10000 100000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Callable, Optional

import redis
from _harness import (
    ROOT,
    exit_on_sigterm,
    load_average,
    machine,
    pause,
    percentile,
    print_table,
    private_server,
    workdir,
    write_report,
)
from scale import preseed

import dim
from dim import scripts
from dim.era import Era
from dim.keys import Keys
from dim.messages import Kind, Message
from dim.node import new_node_id
from dim.protocol import ClaimStatus, owner
from dim.settings import Settings
from dim.store import Store

CLK_TCK = os.sysconf("SC_CLK_TCK")
SCRIPT_NAMES = (
    "HEARTBEAT",
    "CLAIM",
    "RELEASE",
    "READ_DESIRED",
    "LEADER_WRITE",
    "LEADER_READ",
    "REPAIR_READ",
    "RETOKEN",
    "LEAVE",
    "FORGET",
    "RESIGN",
    "REPORT_FAILURE",
)
SHA_NAMES = {hashlib.sha1(getattr(scripts, n).encode()).hexdigest(): n for n in SCRIPT_NAMES}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# -- the leader process --------------------------------------------------------------------


def leader_main(args: argparse.Namespace) -> int:
    """A real Manager that leads; its plan and write steps are timed from outside dim."""
    import logging

    from dim import Manager, leader, plan
    from dim import configsource as configsource_module
    from dim import store as store_module

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    out = open(args.timings, "a", encoding="utf-8")  # noqa: SIM115 (lives with the process)
    lock = threading.Lock()

    def record(**fields: Any) -> None:
        with lock:
            out.write(json.dumps(fields) + "\n")
            out.flush()

    def timed(
        owner_obj: Any,
        name: str,
        what: str,
        describe: Callable[..., dict[str, Any]],
        slower_than: float = 0.0,
    ) -> None:
        original = getattr(owner_obj, name)

        def wrapper(*a: Any, **kw: Any) -> Any:
            started = time.monotonic()
            error = None
            returned: Any = None
            try:
                returned = original(*a, **kw)
                return returned
            except BaseException as exc:
                error = f"{type(exc).__name__}: {exc}"[:200]
                raise
            finally:
                ended = time.monotonic()
                if ended - started >= slower_than or error is not None:
                    try:
                        extra = describe(*a, **kw)
                    except Exception:
                        extra = {}
                    if isinstance(returned, tuple) and returned and isinstance(returned[0], int):
                        extra["returned"] = returned[0]  # leader_write: version, or refused
                    record(fn=what, t=started, dur=ended - started, error=error, **extra)

        setattr(owner_obj, name, wrapper)

    seen_live: list[set[str]] = [set()]

    def plan_info(wanted: Any, members: Any, *_a: Any, **kw: Any) -> dict[str, Any]:
        live = set(members.live)
        gone = sorted(seen_live[0] - live)[:5]
        seen_live[0] = live
        return {
            "configs": len(wanted.configs),
            "nodes": len(live),
            "left_since_last_plan": gone,
            "dead": list(members.dead)[:5],
            "holding": sorted(members.holding)[:5],
            "exclude": kw.get("exclude"),
            "now_ms": members.now_ms,
        }

    def write_info(_self: Any, _value: str, change: Any, *_a: Any, **_kw: Any) -> dict[str, Any]:
        return {"entries": change.entries(), "assign": len(change.assign)}

    def none(*_a: Any, **_kw: Any) -> dict[str, Any]:
        return {}

    timed(plan, "plan", "plan", plan_info)
    timed(store_module.Store, "leader_write", "leader_write", write_info)
    timed(store_module.Store, "leader_read", "leader_read", none)
    timed(store_module.Store, "claims", "read_claims", lambda _s, c: {"claims": len(c)})
    timed(leader.LeaderLoop, "_rebalance", "rebalance", none)
    # the leader's own heartbeats, those slower than 0.2 s (or failed)
    timed(store_module.Store, "heartbeat", "slow_heartbeat", none, slower_than=0.2)
    timed(leader.LeaderLoop, "_lead", "lead", none)
    timed(configsource_module.ConfigSource, "_load", "get_config+parse", none)

    # the leader's own heartbeats: a gap of more than two intervals between two of them
    # is recorded, with every thread's stack while it lasts (what held the beat up)
    from dim import node as node_module

    last_beat = [time.monotonic()]
    original_beat = node_module.Heartbeat.beat

    def beat(self: Any) -> None:
        now = time.monotonic()
        if now - last_beat[0] > 2.0:
            record(fn="heartbeat_gap", t=last_beat[0], dur=now - last_beat[0], error=None)
        last_beat[0] = now
        original_beat(self)

    node_module.Heartbeat.beat = beat  # type: ignore[method-assign]

    def watch_beats() -> None:
        dumped = 0.0
        while True:
            now = time.monotonic()
            if now - last_beat[0] > 2.5 and last_beat[0] != dumped:
                dumped = last_beat[0]
                import traceback

                stacks = {
                    t.name: "".join(traceback.format_stack(sys._current_frames()[t.ident]))[-1500:]
                    for t in threading.enumerate()
                    if t.ident in sys._current_frames()
                }
                record(fn="stacks", t=now, dur=now - last_beat[0], error=None, stacks=stacks)
            pause(0.25)

    threading.Thread(target=watch_beats, name="capacity-beat-watch", daemon=True).start()

    configs = [{"id": i} for i in range(args.configs)]
    settings = Settings(**json.loads(args.settings))
    stop = threading.Event()
    go = threading.Event()

    def commands() -> None:
        for line in sys.stdin:
            if line.strip() == "go":
                go.set()
        go.set()
        stop.set()

    def get_config() -> list[dict[str, Any]]:
        # the first call waits for the members to join (under config_timeout), so that
        # the first plan places the configs over every node, not all on the leader
        go.wait()
        return configs

    threading.Thread(target=commands, name="capacity-commands", daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    manager = Manager(
        get_config=get_config,
        create=lambda config: config,
        disconnect=lambda instance: None,
        redis=args.redis,
        service=args.service,
        settings=settings,
    )
    manager.start()
    record(fn="started", t=time.monotonic(), dur=0.0, node=manager.node_id)
    print(f"READY {manager.node_id}", flush=True)
    stop.wait()
    manager.stop()
    out.close()
    return 0


# -- the load generator ---------------------------------------------------------------------


class _Captured(Exception):
    """A store method built its script call: here it is, not sent."""


class _Script:
    """What :class:`Store` registers instead of a redis-py Script: it captures a call
    (first pass) or hands back the reply the pipeline got for it (second pass)."""

    def __init__(self, shim: Shim, text: str) -> None:
        self.shim = shim
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    def __call__(
        self, keys: Sequence[Any] = (), args: Sequence[Any] = (), client: Any = None
    ) -> Any:
        shim = self.shim
        if shim.reply is not None:
            reply, shim.reply = shim.reply, None
            shim.now = shim.received  # the era reads the time the reply came back
            return reply
        shim.captured = (self.sha, list(keys), list(args))
        raise _Captured


class Shim:
    """The 'client' of every simulated member's Store, and their clock."""

    def __init__(self) -> None:
        self.captured: Optional[tuple[str, list[Any], list[Any]]] = None
        self.reply: Any = None
        self.now: Optional[float] = None  # pinned while a reply is decoded
        self.received = 0.0

    def register_script(self, text: str) -> _Script:
        return _Script(self, text)

    def clock(self) -> float:
        return time.monotonic() if self.now is None else self.now


def pack_command(args: Sequence[Any]) -> bytes:
    """One command in RESP: the bytes redis-py sends for it (str as UTF-8, numbers as
    their repr, bytes as they are)."""
    parts = [b"*%d\r\n" % len(args)]
    append = parts.append
    for arg in args:
        data = arg if type(arg) is bytes else str(arg).encode()
        append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


class _More(Exception):
    """The buffer ends inside a reply."""


def _parse(buf: bytes, pos: int) -> tuple[Any, int]:
    """One RESP2 reply from ``buf[pos:]`` (raises _More if it is incomplete)."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _More
    kind = buf[pos : pos + 1]
    line = buf[pos + 1 : end]
    pos = end + 2
    if kind == b"$":
        n = int(line)
        if n < 0:
            return None, pos
        if len(buf) < pos + n + 2:
            raise _More
        return buf[pos : pos + n], pos + n + 2
    if kind == b"*":
        n = int(line)
        if n < 0:
            return None, pos
        items = []
        for _ in range(n):
            item, pos = _parse(buf, pos)
            items.append(item)
        return items, pos
    if kind == b":":
        return int(line), pos
    if kind == b"+":
        return line, pos
    if kind == b"-":
        return redis.ResponseError(line.decode("utf-8", "replace")), pos
    raise redis.ConnectionError(f"unexpected reply {kind!r}")


class Wire:
    """A plain RESP2 connection for the generator's pipelines: redis-py packs and parses
    in Python at about 150 us a call, which two cores cannot afford ten thousand times
    a second. The commands are the same bytes; hiredis parses the replies if it is
    installed, else a small parser here."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=120)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        try:
            import hiredis

            self.reader: Any = hiredis.Reader(replyError=redis.ResponseError)
        except ImportError:
            self.reader = None

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def receive(self, count: int) -> list[Any]:
        if self.reader is not None:
            return self._hiredis(count)
        out: list[Any] = []
        buf, pos = self.buf, 0
        while len(out) < count:
            try:
                reply, pos = _parse(buf, pos)
            except _More:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    raise redis.ConnectionError("the server closed the connection") from None
                buf = buf[pos:] + chunk
                pos = 0
                continue
            out.append(reply)
        self.buf = buf[pos:]  # the start of the next pipeline's replies, if any
        return out

    def _hiredis(self, count: int) -> list[Any]:
        out: list[Any] = []
        while len(out) < count:
            reply = self.reader.gets()
            if reply is False:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    raise redis.ConnectionError("the server closed the connection")
                self.reader.feed(chunk)
                continue
            out.append(reply)
        return out

    def close(self) -> None:
        self.sock.close()


class _Encoded:
    """A hint encoded once: the heartbeat sends the same bytes every time (a node
    encodes its ``joined`` hint for every beat; the generator cannot afford that)."""

    def __init__(self, message: Message) -> None:
        self.data = message.encode()

    def encode(self) -> bytes:
        return self.data


class Member:
    """One simulated node: a real description, a Store and what it holds."""

    def __init__(self, shim: Shim, service: str, settings: Settings, index: int) -> None:
        self.node_id = new_node_id() + f"-{index}"
        self.session = secrets.token_hex(6)
        max_delay = 2 * settings.socket_timeout + 0.1  # as Manager._era builds it
        era = Era(shim.clock, max_delay, settings.reset_window, settings.fence_margin / 2)
        self.store = Store(shim, service, era=era)  # type: ignore[arg-type]
        self.info = {
            "host": socket.gethostname(),
            "pid": str(os.getpid()),
            "started": f"{time.time():.3f}",
            "weight": repr(1.0),
            "version": dim.__version__,
            "session": self.session,
            "static": "0",
            "tags": "",
            "capacity": "",
        }
        self.desired: set[str] = set()
        self.read_version: Optional[str] = None
        self.held: dict[str, int] = {}  # ckey -> token
        self.joined = _Encoded(Message(Kind.JOINED, self.node_id))
        self.last_ok: Optional[float] = None
        self.max_gap = 0.0
        self.beats = 0

    def pending(self) -> list[str]:
        return [c for c in self.desired if c not in self.held]


class Generator:
    """Simulated members, pipelined, on one thread."""

    def __init__(
        self,
        server: Any,
        service: str,
        settings: Settings,
        members: int,
        nodes_total: int,
        configs: int,
        claim: bool,
        batch: int,
    ) -> None:
        self.client = server.client(socket_timeout=120)
        self.wire = Wire(server.host, server.port)  # heartbeats
        self.wire2 = Wire(server.host, server.port)  # reads, claims, releases
        self.to_read: set[Member] = set()
        self.to_claim: set[Member] = set()
        self.just_read: set[Member] = set()
        self.settings = settings
        self.keys = Keys(service)
        self.shim = Shim()
        self.members = [Member(self.shim, service, settings, i) for i in range(members)]
        self.nodes_total = nodes_total
        self.configs = configs
        self.claim = claim
        self.batch = batch
        self.stop_event = threading.Event()
        self.converged = threading.Event()
        self.t0 = 0.0
        self.converged_at: Optional[float] = None
        self.lags: list[tuple[float, float]] = []  # (when, lag) per heartbeat batch
        self.round_trips = 0  # pipelines sent
        self.calls = 0  # script calls sent
        self.stale = 0
        self.errors: list[str] = []
        self.not_ok: dict[str, int] = {}
        self.lost_claims = 0
        self.claims_taken = 0
        self.released = 0
        self.read_count = 0
        self.last_state: dict[str, Any] = {}
        self._checked = 0.0
        self.tick = 0.02  # at most one heartbeat pipeline per tick
        self.thread = threading.Thread(target=self._run, name="capacity-generator", daemon=True)
        for text in (scripts.HEARTBEAT, scripts.CLAIM, scripts.RELEASE, scripts.READ_DESIRED):
            self.client.script_load(text)

    # -- one pipelined round of script calls --------------------------------------------

    def send_calls(self, wire: Wire, calls: list[tuple[Member, Callable[[Store], Any]]]) -> Any:
        """Capture each call through its member's Store and send them in one pipeline;
        :meth:`finish_calls` reads the replies."""
        shim = self.shim
        packed = []
        for member, call in calls:
            shim.now = None
            try:
                call(member.store)
            except _Captured:
                pass
            assert shim.captured is not None
            sha, keys, args = shim.captured
            shim.captured = None
            packed.append(pack_command(("EVALSHA", sha, len(keys), *keys, *args)))
        sent = time.monotonic()
        wire.send(b"".join(packed))
        self.round_trips += 1
        self.calls += len(calls)
        return wire, calls, sent

    def finish_calls(self, handle: Any) -> list[Any]:
        """The replies of one pipeline, each decoded by the Store method that built its
        call: each call's result, or its exception."""
        wire, calls, sent = handle
        shim = self.shim
        replies = wire.receive(len(calls))
        received = time.monotonic()
        results: list[Any] = []
        for (member, call), reply in zip(calls, replies):
            if isinstance(reply, Exception):
                results.append(reply)
                continue
            shim.now = sent
            shim.received = received
            shim.reply = reply
            try:
                results.append(call(member.store))
            except Exception as exc:
                results.append(exc)
            finally:
                shim.now = None
                shim.reply = None
        return results

    def run_calls(self, calls: list[tuple[Member, Callable[[Store], Any]]]) -> list[Any]:
        """One pipeline on the follow-up connection, replies decoded."""
        return self.finish_calls(self.send_calls(self.wire2, calls))

    def _error(self, what: str, exc: BaseException) -> None:
        if len(self.errors) < 50:
            self.errors.append(f"{what}: {type(exc).__name__}: {exc}"[:300])

    # -- the member's steps ---------------------------------------------------------------

    def send_heartbeats(self, batch: list[Member]) -> Any:
        s = self.settings

        def beat(m: Member) -> Callable[[Store], Any]:
            claims = {c: (owner(m.node_id, t), s.lease) for c, t in m.held.items()}
            return lambda store: store.heartbeat(
                m.node_id,
                node_ttl=s.node_ttl,
                leader_ttl=s.leader_ttl,
                leaving=False,
                may_lead=False,
                renew_leader="",
                info=m.info,
                claims=claims,
                joined=m.joined,  # type: ignore[arg-type]
                session=m.session,
                health=f"{len(m.held)} 0",
            )

        return batch, self.send_calls(self.wire, [(m, beat(m)) for m in batch])

    def finish_heartbeats(self, handle: Any) -> None:
        batch, calls = handle
        sent = calls[2]
        results = self.finish_calls(calls)
        for m, result in zip(batch, results):
            if isinstance(result, Exception):
                self._error("heartbeat", result)
                continue
            if result.stale:
                self.stale += 1
                continue
            if result.outcome != "ok":
                self.not_ok[result.outcome] = self.not_ok.get(result.outcome, 0) + 1
                continue
            if m.last_ok is not None:
                m.max_gap = max(m.max_gap, sent - m.last_ok)
            m.last_ok = sent
            m.beats += 1
            for ckey, status in result.claims.items():
                if status in (ClaimStatus.LOST, ClaimStatus.RELEASED):
                    m.held.pop(ckey, None)
                    self.lost_claims += 1
            if result.version != m.read_version:
                self.to_read.add(m)
            if self.claim and len(m.held) < len(m.desired):
                self.to_claim.add(m)  # pending claims are retried every heartbeat

    def reads(self, batch: list[Member]) -> None:
        def read(m: Member) -> Callable[[Store], Any]:
            handled = list(set(m.held) | m.desired)
            return lambda store: store.read_desired(m.node_id, handled)

        results = self.run_calls([(m, read(m)) for m in batch])
        for m, result in zip(batch, results):
            if isinstance(result, Exception):
                self._error("read_desired", result)
                continue
            self.read_count += 1
            self.to_read.discard(m)
            m.read_version = result.version
            m.desired = set(result.entries)  # a whole read: no version held
            if self.claim:
                self.to_claim.add(m)
                self.just_read.add(m)

    def releases(self, batch: list[tuple[Member, dict[str, int]]]) -> None:
        calls = [
            (m, lambda store, m=m, t=t: store.release(m.node_id, t, Message.released(m.node_id, t)))
            for m, t in batch
        ]
        results = self.run_calls(calls)
        for (m, tokens), result in zip(batch, results):
            if isinstance(result, Exception):
                self._error("release", result)
                continue
            for ckey in tokens:
                if m.held.get(ckey) == tokens[ckey]:
                    del m.held[ckey]
            self.released += len(tokens)

    def claims(self, batch: list[tuple[Member, list[str]]]) -> None:
        ttl = self.settings.create_lease
        calls = [
            (m, lambda store, m=m, c=c: store.claim(m.node_id, c, ttl, m.session)) for m, c in batch
        ]
        results = self.run_calls(calls)
        for (m, _ckeys), result in zip(batch, results):
            if isinstance(result, Exception):
                self._error("claim", result)
                continue
            for ckey, token in result.items():
                if token > 0:
                    m.held[ckey] = token
                    self.claims_taken += 1

    # -- the loop ---------------------------------------------------------------------------

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.thread.start()

    def close(self) -> None:
        self.stop_event.set()
        self.thread.join(60)
        self.client.close()
        self.wire.close()
        self.wire2.close()

    def _chunks(self, items: list[Any], weight: Callable[[Any], int]) -> Iterable[list[Any]]:
        """Pipelines of at most ``batch`` calls and about 20,000 keys and arguments."""
        chunk: list[Any] = []
        size = 0
        for item in items:
            w = weight(item)
            if chunk and (len(chunk) >= self.batch or size + w > 20_000):
                yield chunk
                chunk, size = [], 0
            chunk.append(item)
            size += w
        if chunk:
            yield chunk

    def _follow_ups(self) -> None:
        """Reads, releases and claims that the heartbeats called for."""
        reading = list(self.to_read)
        for chunk in self._chunks(reading, lambda m: 1 + len(m.held)):
            self.reads(chunk)
        lost = []
        for m in self.just_read:
            gone = {c: t for c, t in m.held.items() if c not in m.desired}
            if gone:
                lost.append((m, gone))
        self.just_read = set()
        for chunk in self._chunks(lost, lambda x: 1 + len(x[1])):
            self.releases(chunk)
        wanted = []
        for m in self.to_claim:
            if m not in self.to_read:
                pending = m.pending()
                if pending:
                    wanted.append((m, pending))
        self.to_claim = set()
        for chunk in self._chunks(wanted, lambda x: 1 + len(x[1])):
            self.claims(chunk)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:
            self._error("generator", exc)
            self.stop_event.set()

    def _loop(self) -> None:
        interval = self.settings.heartbeat_interval
        n = len(self.members)
        spacing = interval / max(1, n)
        index = 0  # next member to beat, in rounds
        last_batch_at: Optional[float] = None
        in_flight: Any = None
        while not self.stop_event.is_set():
            now = time.monotonic()
            due = self.t0 + index * spacing
            if due > now:
                if in_flight is not None:
                    self.finish_heartbeats(in_flight)
                    in_flight = None
                    self._follow_ups()
                    continue
                self._check(now)
                self.stop_event.wait(min(due - now, 0.05))
                continue
            # every member that is due now, a batch at most
            last = index
            while last - index < self.batch and self.t0 + last * spacing <= now:
                last += 1
            if (
                last - index < self.batch
                and last_batch_at is not None
                and now - last_batch_at < self.tick
            ):
                # not behind: gather a tick's worth of due members into one pipeline
                self.stop_event.wait(self.tick - (now - last_batch_at))
                continue
            last_batch_at = now
            batch = [self.members[i % n] for i in range(index, last)]
            self.lags.append((now - self.t0, now - due))
            index = last
            # two heartbeat pipelines in flight: Redis runs one while this thread
            # decodes the other
            handle = self.send_heartbeats(batch)
            if in_flight is not None:
                self.finish_heartbeats(in_flight)
            in_flight = handle
            self._follow_ups()
            self._check(time.monotonic())
        if in_flight is not None:
            self.finish_heartbeats(in_flight)

    def _check(self, now: float) -> None:
        """Is the cluster converged? (Every 0.25 s at most.)"""
        if self.converged.is_set() or now - self._checked < 0.25:
            return
        self._checked = now
        state = self.state()
        self.last_state = state
        if state["converged"]:
            self.converged_at = now
            self.converged.set()

    def state(self) -> dict[str, Any]:
        k = self.keys
        c = self.client
        with c.pipeline(transaction=False) as pipe:
            pipe.get(k.version)
            pipe.get(k.leader)
            pipe.hlen(k.assignment)
            pipe.hlen(k.unplaced)
            pipe.hgetall(k.shares)
            version, leader, assigned, unplaced, shares = pipe.execute()
        version = version.decode() if version else None
        leader_id = leader.decode().rpartition(":")[0] if leader else None
        leader_share = leader_running = 0
        if leader_id:
            with c.pipeline(transaction=False) as pipe:
                pipe.scard(k.desired(leader_id))
                pipe.hget(k.node(leader_id), "health")
                leader_share, health = pipe.execute()
            leader_running = int((health or b"0").split()[0])
        loads = [len(m.desired) for m in self.members]
        # a member is behind until it has read its share at the share's version
        shares = {key.decode(): value.decode() for key, value in shares.items()}
        behind = sum(1 for m in self.members if m.read_version != shares.get(m.node_id))
        unclaimed = sum(len(m.pending()) for m in self.members) if self.claim else 0
        total = sum(loads) + leader_share
        fair = math.ceil(self.configs / self.nodes_total)
        top = max([*loads, leader_share]) if loads else leader_share
        converged = (
            version is not None
            and behind == 0
            and total == self.configs
            and assigned == self.configs
            and unplaced == 0
            and top <= fair
            and unclaimed == 0
            and (not self.claim or leader_running == leader_share)
        )
        return {
            "version": version,
            "members_behind": behind,
            "assigned_in_desired": total,
            "assignment_hlen": assigned,
            "unplaced": unplaced,
            "max_load": top,
            "fair_max": fair,
            "unclaimed": unclaimed,
            "leader_share": leader_share,
            "leader_running": leader_running,
            "converged": converged,
        }

    def dropped(self) -> int:
        ttl = self.settings.node_ttl
        return sum(1 for m in self.members if m.max_gap > ttl)


# -- one cell -------------------------------------------------------------------------------


def redis_stats(client: Any) -> dict[str, Any]:
    calls = {
        name.replace("cmdstat_", ""): int(v["calls"])
        for name, v in client.info("commandstats").items()
    }
    memory = client.info("memory")
    return {"calls": calls, "used_memory": int(memory["used_memory"])}


def slowlog(client: Any) -> list[dict[str, Any]]:
    """Every slow-log entry, named by script for EVALSHA."""
    out = []
    for entry in client.slowlog_get(100_000):
        command = entry.get("command", b"")
        if isinstance(command, bytes):
            command = command.decode("utf-8", "replace")
        parts = command.split()
        name = parts[0].lower() if parts else "?"
        if name == "evalsha" and len(parts) > 1:
            name = SHA_NAMES.get(parts[1], "evalsha?")
        out.append({"command": name, "us": int(entry["duration"]), "start": entry["start_time"]})
    return out


def run_cell(
    work: Path,
    n_nodes: int,
    n_configs: int,
    *,
    settings_json: dict[str, Any],
    claim_max: int,
    batch: int,
    timeout: float,
    window: float,
) -> dict[str, Any]:
    service = f"cap-{n_nodes}x{n_configs}"
    settings = Settings(**settings_json)
    claim = n_configs <= claim_max
    cell: dict[str, Any] = {
        "nodes": n_nodes,
        "configs": n_configs,
        "simulated_members": n_nodes - 1,
        "claims": claim,
        "ok": False,
        # other work on the machine distorts every number here: say how busy it was
        "load_average_at_start": load_average(),
    }
    server = private_server(work / f"{service}-redis")
    timings_path = work / f"{service}.leader.jsonl"
    leader_log = work / f"{service}.leader.log"
    leader = None
    gen = None
    measured_until: Optional[float] = None
    try:
        client = server.client(socket_timeout=120)
        client.config_set("slowlog-log-slower-than", 10_000)  # 10 ms
        client.config_set("slowlog-max-len", 100_000)
        preseed(client, service)
        # and the era, so that the first script sees a service that ran on this very
        # server before (no reset window: that is a restart's cost, not capacity's)
        client.set(Keys(service).era, client.info("server")["run_id"])
        cell["redis_memory_empty"] = int(client.info("memory")["used_memory"])
        with open(leader_log, "ab") as log:
            leader = subprocess.Popen(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--leader-process",
                    "--redis",
                    server.url,
                    "--service",
                    service,
                    "--configs-count",
                    str(n_configs),
                    "--timings",
                    str(timings_path),
                    "--settings",
                    json.dumps(settings_json),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=str(ROOT),
                text=True,
            )
        assert leader.stdout is not None
        line = leader.stdout.readline()
        if not line.startswith("READY"):
            raise RuntimeError(f"the leader process did not start; see {leader_log}")
        leader_id = line.split()[1]
        keys = Keys(service)

        def leads() -> bool:
            value = client.get(keys.leader)
            return bool(value) and value.decode().startswith(leader_id + ":")

        deadline = time.monotonic() + 30
        while not leads():
            if time.monotonic() > deadline or leader.poll() is not None:
                raise RuntimeError(f"the leader did not win the leadership; see {leader_log}")
            pause(0.02)
        gen = Generator(server, service, settings, n_nodes - 1, n_nodes, n_configs, claim, batch)
        before = redis_stats(client)
        redis_cpu0, leader_cpu0, gen_cpu0 = (
            cpu_seconds(server.pid),
            cpu_seconds(leader.pid),
            cpu_seconds(os.getpid()),
        )
        gen.start()
        t0 = gen.t0
        # every member has joined (one heartbeat each): let the leader have its configs
        # (its get_config waits for this, at most 8 s: config_timeout is 10 s)
        while sum(1 for m in gen.members if m.beats) < len(gen.members):
            if time.monotonic() - t0 > 8 or gen.stop_event.is_set():
                break
            pause(0.02)
        cell["members_joined_after"] = time.monotonic() - t0
        cell["members_joined"] = sum(1 for m in gen.members if m.beats)
        assert leader.stdin is not None
        leader.stdin.write("go\n")
        leader.stdin.flush()
        t_go = time.monotonic()
        deadline = t0 + timeout
        while not gen.converged.is_set() and not gen.stop_event.is_set():
            if time.monotonic() > deadline:
                break
            gen.converged.wait(0.1)
        converged = gen.converged.is_set()
        if gen.converged_at is not None:
            cell["converged_after"] = gen.converged_at - t_go
        else:
            cell["converged_after"] = None
            cell["not_converged_state"] = gen.last_state
        start_phase_end = time.monotonic()
        after_start = redis_stats(client)
        redis_cpu1, leader_cpu1, gen_cpu1 = (
            cpu_seconds(server.pid),
            cpu_seconds(leader.pid),
            cpu_seconds(os.getpid()),
        )
        elapsed = start_phase_end - t0
        cell["start_phase"] = {
            "seconds": elapsed,
            "redis_cpu": (redis_cpu1 - redis_cpu0) / elapsed,
            "leader_cpu": (leader_cpu1 - leader_cpu0) / elapsed,
            "generator_cpu": (gen_cpu1 - gen_cpu0) / elapsed,
            "script_calls": script_calls(before, after_start),
        }
        if converged:
            # the steady window: nothing changes, every member heartbeats
            lag_mark = len(gen.lags)
            calls_mark = gen.calls
            pause(window)
            after = redis_stats(client)
            redis_cpu2, leader_cpu2, gen_cpu2 = (
                cpu_seconds(server.pid),
                cpu_seconds(leader.pid),
                cpu_seconds(os.getpid()),
            )
            w = time.monotonic() - start_phase_end
            lags = [lag for _, lag in gen.lags[lag_mark:]]
            commands = sum(after["calls"].values()) - sum(after_start["calls"].values())
            cell["steady"] = {
                "seconds": w,
                "commands_per_s": commands / w,
                "script_calls_per_s": script_calls(after_start, after)["total"] / w,
                "script_calls": script_calls(after_start, after),
                "generator_calls_per_s": (gen.calls - calls_mark) / w,
                "redis_cpu": (redis_cpu2 - redis_cpu1) / w,
                "leader_cpu": (leader_cpu2 - leader_cpu1) / w,
                "generator_cpu": (gen_cpu2 - gen_cpu1) / w,
                "lag_p99": percentile(lags, 99) if lags else None,
                "lag_max": max(lags) if lags else None,
                "claims_held": sum(len(m.held) for m in gen.members),
            }
            cell["used_memory"] = after["used_memory"]
            cell["ok"] = True
        else:
            cell["used_memory"] = after_start["used_memory"]
        measured_until = time.monotonic()
        cell["slowlog"] = slowlog(client)
        client.close()
    except Exception as exc:
        cell["error"] = f"{type(exc).__name__}: {exc}"[:1000]
    finally:
        if gen is not None:
            gen.close()
            lags = [lag for _, lag in gen.lags]
            cell["generator"] = {
                "lag_p99": percentile(lags, 99) if lags else None,
                "lag_max": max(lags) if lags else None,
                "round_trips": gen.round_trips,
                "calls": gen.calls,
                "stale_replies": gen.stale,
                "not_ok": gen.not_ok,
                "dropped_members": gen.dropped(),
                "max_heartbeat_gap": max((m.max_gap for m in gen.members), default=0.0),
                "reads": gen.read_count,
                "claims_taken": gen.claims_taken,
                "claims_lost": gen.lost_claims,
                "released": gen.released,
                "errors": gen.errors[:20],
                "last_state": gen.last_state,
            }
        if leader is not None:
            if leader.stdin is not None:
                leader.stdin.close()
            if leader.poll() is None:
                leader.send_signal(signal.SIGTERM)
            try:
                leader.wait(timeout=30)
            except subprocess.TimeoutExpired:
                leader.kill()
                leader.wait()
            if leader.stdout is not None:
                leader.stdout.close()
        cell["load_average_at_end"] = load_average()
        cell["leader"] = leader_timings(timings_path, measured_until)
        try:
            cell["leader_log_tail"] = leader_log.read_text()[-3000:].splitlines()[-15:]
        except OSError:
            cell["leader_log_tail"] = []
        server.close()
    return cell


def script_calls(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """EVALSHA calls in a window: what a real node's round trips to scripts would be."""
    n = after["calls"].get("evalsha", 0) - before["calls"].get("evalsha", 0)
    n += after["calls"].get("eval", 0) - before["calls"].get("eval", 0)
    return {"total": n}


def leader_timings(path: Path, until: Optional[float]) -> dict[str, Any]:
    """The leader's timed steps, from the JSON lines its process wrote, up to ``until``
    (the end of the measurement; both processes read the same monotonic clock): what
    came later is the leader's graceful stop (its final rebalance), counted apart."""
    records = []
    try:
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    except OSError:
        return {}
    out: dict[str, Any] = {}
    if until is not None:
        out["at_stop"] = [
            {k: r.get(k) for k in ("fn", "dur", "entries", "nodes", "error")}
            for r in records
            if r["t"] > until and r["fn"] in ("plan", "leader_write")
        ]
        records = [r for r in records if r["t"] <= until]
    for fn in (
        "plan",
        "leader_write",
        "rebalance",
        "get_config+parse",
        "read_claims",
        "lead",
        "slow_heartbeat",
        "heartbeat_gap",
    ):
        rows = [r for r in records if r["fn"] == fn]
        if not rows:
            continue
        durs = [r["dur"] for r in rows]
        out[fn] = {
            "n": len(rows),
            "max": max(durs),
            "total": sum(durs),
            "errors": sum(1 for r in rows if r.get("error")),
            "first_error": next((r["error"] for r in rows if r.get("error")), None),
            "largest": max(rows, key=lambda r: r["dur"]),
        }
    out["writes"] = [
        {k: r.get(k) for k in ("dur", "entries", "assign", "error", "returned")}
        for r in records
        if r["fn"] == "leader_write"
    ][:50]
    out["writes_refused"] = sum(
        1 for r in records if r["fn"] == "leader_write" and (r.get("returned") or 0) < 0
    )
    out["stacks"] = [r for r in records if r["fn"] == "stacks"][:3]
    out["plans"] = [
        {k: v for k, v in r.items() if k != "fn"} for r in records if r["fn"] == "plan"
    ][:50]
    return out


# -- report -----------------------------------------------------------------------------------


def fmt(value: Optional[float], scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def cell_row(cell: dict[str, Any]) -> list[Any]:
    lead = cell.get("leader", {})
    steady = cell.get("steady", {})
    gen = cell.get("generator", {})
    writes = [e for e in cell.get("slowlog", []) if e["command"] == "LEADER_WRITE"]
    plan = lead.get("plan", {})
    write = lead.get("leader_write", {})
    return [
        cell["nodes"],
        cell["configs"],
        "yes" if cell["claims"] else "no",
        fmt(plan.get("max"), 1e3, 0),
        fmt(lead.get("rebalance", {}).get("max"), 1e3, 0),
        fmt(write.get("max"), 1e3, 0),
        f"{write.get('n', 0)}/{lead.get('writes_refused', 0)}/{write.get('errors', 0)}",
        fmt(max((e["us"] for e in writes), default=None), 1e-3, 0),
        fmt(cell.get("converged_after"), 1, 1),
        fmt(steady.get("script_calls_per_s"), 1, 0),
        fmt(steady.get("commands_per_s"), 1, 0),
        fmt(steady.get("redis_cpu"), 100, 0),
        fmt(steady.get("leader_cpu"), 100, 0),
        fmt(steady.get("generator_cpu"), 100, 0),
        fmt(cell.get("used_memory"), 1 / 2**20, 0),
        fmt(gen.get("lag_max"), 1e3, 0),
        gen.get("dropped_members", "-"),
        fmt((cell.get("load_average_at_end") or [None])[0], 1, 1),
        "ok" if cell["ok"] else ("FAILED" if cell.get("error") else "no conv."),
    ]


HEADERS = [
    "N",
    "M",
    "claims",
    "plan ms",
    "rebalance ms",
    "write ms",
    "writes/refused/err",
    "LUA write ms",
    "conv s",
    "scripts/s",
    "cmds/s",
    "redis %",
    "leader %",
    "gen %",
    "mem MB",
    "lag max ms",
    "dropped",
    "load 1m",
    "result",
]


def fit_renewals(cells: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """redis CPU (share of a core) = a * heartbeats/s + b * claim renewals/s, from the
    steady windows (least squares, two unknowns, no intercept)."""
    interval = None
    pts = []
    for c in cells:
        s = c.get("steady")
        if not s:
            continue
        interval = c.get("heartbeat_interval", 1.0)
        pts.append((c["nodes"] / interval, s["claims_held"] / interval, s["redis_cpu"]))
    if len(pts) < 2:
        return None
    sxx = sum(x * x for x, _, _ in pts)
    syy = sum(y * y for _, y, _ in pts)
    sxy = sum(x * y for x, y, _ in pts)
    sxz = sum(x * z for x, _, z in pts)
    syz = sum(y * z for _, y, z in pts)
    det = sxx * syy - sxy * sxy
    if det == 0:
        return None
    a = (sxz * syy - syz * sxy) / det
    b = (sxx * syz - sxy * sxz) / det
    return {
        "cpu_per_heartbeat_us": a * 1e6,
        "cpu_per_claim_renewal_us": b * 1e6,
        "points": len(pts),
        "interval": interval,
    }


def limits(cells: list[dict[str, Any]], settings: Settings) -> dict[str, Any]:
    """What runs out first, in numbers: Redis CPU per heartbeat and per claim renewal
    (so how many nodes and claimed configs one core of Redis holds), and the leader's
    tick against its lease budget (``leader_ttl - heartbeat_interval``: a leader loop
    busy for longer stops renewing its key, protocol.rst section 3)."""
    out: dict[str, Any] = {"fit": fit_renewals(cells)}
    fit = out["fit"]
    interval = settings.heartbeat_interval
    if fit and fit["cpu_per_heartbeat_us"] > 0 and fit["cpu_per_claim_renewal_us"] > 0:
        out["nodes_per_redis_core"] = interval / (fit["cpu_per_heartbeat_us"] * 1e-6)
        out["claimed_configs_per_redis_core"] = interval / (fit["cpu_per_claim_renewal_us"] * 1e-6)
    budget = settings.leader_ttl - settings.heartbeat_interval
    out["leader_tick_budget"] = budget
    out["leader_tick"] = [
        {
            "nodes": c["nodes"],
            "configs": c["configs"],
            "rebalance_max": c.get("leader", {}).get("rebalance", {}).get("max"),
            "heartbeat_gap_max": c.get("leader", {}).get("heartbeat_gap", {}).get("max"),
            "over_budget": (c.get("leader", {}).get("rebalance", {}).get("max") or 0) > budget,
            "writes_refused": c.get("leader", {}).get("writes_refused", 0),
        }
        for c in cells
    ]
    return out


def print_limits(lim: dict[str, Any]) -> None:
    fit = lim.get("fit")
    print("\nlimits:")
    if fit:
        print(
            f"  redis CPU per heartbeat (no claims): {fit['cpu_per_heartbeat_us']:.1f} us; "
            f"per claim renewal: {fit['cpu_per_claim_renewal_us']:.2f} us "
            f"(least squares over {fit['points']} steady windows)"
        )
    if "nodes_per_redis_core" in lim:
        print(
            f"  one Redis core holds about {lim['nodes_per_redis_core']:,.0f} heartbeating "
            f"nodes, or {lim['claimed_configs_per_redis_core']:,.0f} claimed configs "
            f"(renewed every heartbeat), before anything else runs"
        )
    for row in lim["leader_tick"]:
        if row["rebalance_max"] is None:
            continue
        print(
            f"  N={row['nodes']} M={row['configs']}: the leader's longest rebalance "
            f"{row['rebalance_max']:.2f} s (budget {lim['leader_tick_budget']:.0f} s)"
            + (
                f": OVER, {row['writes_refused']} writes refused (epoch over)"
                if row["over_budget"]
                else ""
            )
        )


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--nodes", type=int, nargs="+", help="N values (default 1000 10000)")
    p.add_argument("--configs", type=int, nargs="+", help="M values (default 10000 100000 1000000)")
    p.add_argument(
        "--claim-max",
        type=int,
        default=None,
        help="members claim (and renew) their configs only up to this M (default 100000)",
    )
    p.add_argument("--batch", type=int, default=200, help="script calls per pipeline (200)")
    p.add_argument("--timeout", type=float, help="seconds to wait for convergence (150)")
    p.add_argument("--window", type=float, help="seconds of the steady window (10)")
    p.add_argument("--settings", default="{}", help="dim.Settings keyword arguments (JSON)")
    p.add_argument("--output", type=Path)
    # the leader process (internal)
    p.add_argument("--leader-process", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--redis", help=argparse.SUPPRESS)
    p.add_argument("--service", help=argparse.SUPPRESS)
    p.add_argument("--configs-count", type=int, help=argparse.SUPPRESS)
    p.add_argument("--timings", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.leader_process:
        args.configs = args.configs_count
        return leader_main(args)
    exit_on_sigterm()
    nodes = args.nodes or ([20, 50] if args.quick else [1000, 10000])
    configs = args.configs or ([200, 2000] if args.quick else [10_000, 100_000, 1_000_000])
    claim_max = args.claim_max if args.claim_max is not None else 100_000
    timeout = args.timeout or (30.0 if args.quick else 150.0)
    window = args.window or (2.0 if args.quick else 10.0)
    settings_json = json.loads(args.settings)
    settings = Settings(**settings_json)

    work = workdir("capacity")
    info_server = private_server(work / "probe")
    try:
        info = machine(info_server)
    finally:
        info_server.close()
    cells = []
    try:
        for n in nodes:
            for m in configs:
                print(f"cell: N={n} M={m}", flush=True)
                started = time.monotonic()
                cell = run_cell(
                    work,
                    n,
                    m,
                    settings_json=settings_json,
                    claim_max=claim_max,
                    batch=args.batch,
                    timeout=timeout,
                    window=window,
                )
                cell["heartbeat_interval"] = settings.heartbeat_interval
                cell["wall_seconds"] = time.monotonic() - started
                cells.append(cell)
                print_table(HEADERS, [cell_row(cell)])
                if cell.get("error"):
                    print(f"  error: {cell['error']}", flush=True)
    finally:
        cleanup_dir(work)

    print()
    print_table(HEADERS, [cell_row(c) for c in cells])
    lim = limits(cells, settings)
    print_limits(lim)
    write_report(
        "capacity",
        {
            "machine": info,
            "settings": {
                "dim": settings_json or "defaults",
                "heartbeat_interval": settings.heartbeat_interval,
                "node_ttl": settings.node_ttl,
                "lease": settings.lease,
                "socket_timeout": settings.socket_timeout,
                "batch": args.batch,
                "claim_max": claim_max,
                "timeout": timeout,
                "window": window,
            },
            "limits": lim,
            "cells": cells,
        },
        args.output,
        args.quick,
    )
    return 0


def cleanup_dir(work: Path) -> None:
    import shutil

    if os.environ.get("DIM_BENCH_KEEP"):
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
