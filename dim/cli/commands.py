"""The ``dim`` subcommands that read, check or steer a cluster: each one a thin layer
over :class:`dim.admin.Admin`, plus what every subcommand shares (the exit-code errors,
the connection, signal handling).

Errors become the command's: a :class:`~dim.errors.ConfigError` (a bad URL, a node that
matches none or several) is a :class:`UsageError` (exit 2); a Redis error, explained in
one line, and a :class:`~dim.errors.StateError` (no leader) are a :class:`CommandError`
(exit 1).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Callable, Optional
from urllib.parse import urlsplit

import redis

from dim import admin as admin_api
from dim import redis_errors
from dim.admin import Admin
from dim.cli.formatting import config_rows, format_configs, format_move, format_status
from dim.cli.target import (
    DEFAULT_REDIS_URL,
    REDIS_URL_ENV,
    SERVICE_ENV,
    resolve_service,
    resolve_url,
)
from dim.connection import describe, safe_url
from dim.errors import ConfigError, DimError, StateError
from dim.status import ClusterStatus
from dim.store import Client

__all__ = [
    "DEFAULT_REDIS_URL",
    "REDIS_URL_ENV",
    "SERVICE_ENV",
    "AdminFactory",
    "CommandError",
    "UsageError",
    "cmd_config",
    "cmd_drain",
    "cmd_pause",
    "cmd_rebalance",
    "cmd_status",
    "cmd_wait",
    "cmd_watch",
    "connect",
    "describe_redis_error",
    "operating",
    "signals_set",
]


#: Makes the Admin of a command embedded in an application (see ``build_parser``).
AdminFactory = Callable[[], Admin]


class UsageError(DimError, ValueError):
    """A bad argument that argparse could not catch: exit code 2."""


class CommandError(DimError, RuntimeError):
    """A runtime failure with a message for the user: exit code 1."""


# -- Redis access ---------------------------------------------------------------------------


def connect(url: str, timeout: float = 5.0) -> Client:
    """A client for ``url`` that fails fast (two quick retries) when Redis is away."""
    try:
        return admin_api.connect(url, timeout)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def describe_redis_error(exc: redis.RedisError, url: str) -> str:
    """One line for the user saying what went wrong with Redis at ``url``."""
    return redis_errors.explain(
        exc,
        safe_url(url),
        has_password=urlsplit(url).password is not None,
        acl_hint="the read-only ACL in dim's docs (Connecting) covers status, watch and "
        "config; pause, resume, drain and rebalance need the operator ACL",
    )


def redis_url(args: argparse.Namespace, *, default: Optional[str] = DEFAULT_REDIS_URL) -> str:
    """The URL the connection options (and their environment variables) make; a
    :class:`UsageError` when they are not valid (see :func:`dim.cli.target.resolve_url`)."""
    try:
        return resolve_url(args, default=default)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


@contextmanager
def operating(args: argparse.Namespace) -> Iterator[Admin]:
    """An :class:`Admin` on the connection options (``--redis``, ``--service``, ...),
    closed on the way out; the errors of what runs inside become the command's (see the
    module docstring).

    An embedded command (``args.admin_factory``) gets its Admin from the application.
    """
    factory: Optional[AdminFactory] = getattr(args, "admin_factory", None)
    url = "the application's Redis"
    try:
        if factory is not None:
            admin = factory()
            url = describe(admin.client)
        else:
            url = resolve_url(args)
            admin = Admin(url, resolve_service(args))
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    except redis.RedisError as exc:  # a cluster's client reads the layout when made
        raise CommandError(describe_redis_error(exc, url)) from None
    try:
        yield admin
    except redis.RedisError as exc:
        raise CommandError(describe_redis_error(exc, url)) from None
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    except StateError as exc:
        raise CommandError(str(exc)) from None
    finally:
        admin.close()


@contextmanager
def signals_set(
    event: threading.Event,
    *signums: int,
    again: Optional[Callable[[int, list[int]], None]] = None,
    keep: bool = False,
) -> Iterator[list[int]]:
    """While inside, these signals set ``event`` (and are recorded) instead of acting;
    one that comes once ``event`` is set calls ``again`` (if given) with its number and
    every number received so far. ``keep``: once ``event`` is set, the handlers stay
    after the block (the process is on its way out: a signal then is still handled as
    one that came during the block, not by the default action), and from the first
    signal on the others of ``signums`` are ignored outright (``SIG_IGN``, which outlives
    the interpreter's exit, where it resets the handlers Python installed)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received  # only the main thread may install handlers
        return

    def handler(signum: int, frame: Optional[FrameType]) -> None:
        received.append(signum)
        if again is not None and event.is_set():
            again(signum, received)
        if keep and not event.is_set():
            for other in signums:
                if other != signum:
                    signal.signal(other, signal.SIG_IGN)
        event.set()

    previous = {signum: signal.signal(signum, handler) for signum in signums}
    try:
        yield received
    finally:
        if not (keep and event.is_set()):
            for signum, old in previous.items():
                signal.signal(signum, old)


# -- dim status, watch, config --------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    with operating(args) as admin:
        status = admin.status()
    if args.json:
        print(json.dumps(status.to_dict(), default=str, indent=2), flush=True)
    else:
        print(format_status(status), flush=True)
    if not args.check:
        return 0
    problems = status.problems(args.min_nodes)
    _report(args, "not settled", problems)
    return 1 if problems else 0


def cmd_wait(args: argparse.Namespace) -> int:
    """``dim wait --settled``: 0 once settled, 1 with the problems left at the timeout."""
    with operating(args) as admin:
        settled = admin.wait_settled(args.timeout, min_nodes=args.min_nodes)
        # read again for the report: what is true now
        status = admin.status()
    if not settled:
        problems = status.problems(args.min_nodes) or [
            "settled in the last read, but not yet confirmed by a heartbeat of every node"
        ]
        _report(args, f"not settled after {args.timeout:g} s", problems)
        return 1
    running = len(status.configs) - len(status.not_running)
    print(
        f"service {status.service} is settled: {running} configs running on "
        f"{len(status.nodes)} nodes, leader {status.leader}",
        flush=True,
    )
    return 0


def _report(args: argparse.Namespace, what: str, problems: list[str]) -> None:
    """One line on stderr per problem, each headed by the command."""
    for problem in problems:
        print(f"{args.parser.prog}: {what}: {problem}", file=sys.stderr, flush=True)


def cmd_watch(args: argparse.Namespace) -> int:
    tty = sys.stdout.isatty()
    log_lines: list[str] = []
    previous: Optional[ClusterStatus] = None
    reads = 0
    stop = threading.Event()
    with operating(args) as admin, signals_set(stop, signal.SIGTERM, signal.SIGINT):
        while not _stopped(args, reads, stop):
            status = admin.status()
            reads += 1
            stamp = time.strftime("%H:%M:%S")
            changes = (
                [format_move(m) for m in admin_api.moves_between(previous, status)]
                if previous is not None
                else []
            )
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
    return 0


def _stopped(args: argparse.Namespace, reads: int, stop: threading.Event) -> bool:
    """Has `dim watch` read enough (--count) or been stopped, after waiting its interval?"""
    if args.count is not None and reads >= args.count:
        return True
    return reads > 0 and stop.wait(args.interval)


def cmd_config(args: argparse.Namespace) -> int:
    with operating(args) as admin:
        listing = admin.configs()
    if args.json:
        print(json.dumps(config_rows(listing), default=str, indent=2), flush=True)
    else:
        print(format_configs(admin.service, listing), flush=True)
    return 0


# -- dim rebalance, pause, resume, drain ----------------------------------------------------


def cmd_rebalance(args: argparse.Namespace) -> int:
    with operating(args) as admin:
        status = admin.rebalance()
    paused = " (rebalancing is paused: nothing moves until 'dim resume')" if status.paused else ""
    print(f"asked the leader {status.leader} to re-plan now{paused}", flush=True)
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    with operating(args) as admin:
        if args.on:
            admin.pause()
        else:
            admin.resume()
    if args.on:
        print(f"rebalancing of {admin.service} is paused until 'dim resume'", flush=True)
    else:
        print(f"rebalancing of {admin.service} resumed", flush=True)
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    with operating(args) as admin:
        node_id = admin.drain(args.node, undo=args.undo)
        if args.undo:
            print(f"node {node_id} takes configs again", flush=True)
            return 0
        print(f"draining node {node_id}", flush=True)
        if args.wait is None:
            return 0
        if not admin.wait_drained(node_id, args.wait):
            status = admin.status()  # for the message (it may have just finished)
            node = next((n for n in status.nodes if n.node_id == node_id), None)
            if node is not None and (node.assigned or node.running):
                raise CommandError(
                    f"node {node_id} still runs {node.running} configs after {args.wait:g} s"
                    + (" (rebalancing is paused)" if status.paused else "")
                )
        print(f"node {node_id} runs nothing now", flush=True)
        return 0
