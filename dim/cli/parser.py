"""The ``dim`` command's arguments: every subcommand, its options and their checks.

The connection options (:mod:`dim.cli.target`) go before or after the subcommand, and
their environment variables are read when the command runs. A bad argument ends the
command with one line and exit code 2. The internal ``demo-node`` subcommand is left
out of the help, the usage line and the list of choices in errors.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable, NoReturn, Optional

from dim.cli.commands import (
    AdminFactory,
    cmd_config,
    cmd_drain,
    cmd_pause,
    cmd_rebalance,
    cmd_status,
    cmd_wait,
    cmd_watch,
)
from dim.cli.demo import cmd_demo, cmd_demo_node
from dim.cli.run import ManagerFactory, cmd_run, run_target
from dim.cli.target import add_options as add_connection_options

#: Subcommands that ``dim`` runs for itself: not listed anywhere.
INTERNAL = frozenset({"demo-node"})


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _Commands(dict[str, argparse.ArgumentParser]):
    """The subcommands by name, whose iteration skips the internal ones: argparse lists
    the choices by iterating (the usage line, an 'invalid choice' error) and looks a
    name up with ``in`` (which still finds them)."""

    def __init__(self, parsers: Mapping[str, argparse.ArgumentParser], hidden: Iterable[str]):
        super().__init__(parsers)
        self.hidden = frozenset(hidden)

    def __iter__(self) -> Iterator[str]:
        return (name for name in super().__iter__() if name not in self.hidden)


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


def build_parser(
    *,
    prog: str = "dim",
    admin: Optional[AdminFactory] = None,
    manager: Optional[ManagerFactory] = None,
) -> argparse.ArgumentParser:
    """The parser of every subcommand (defaults read from the environment now).

    :param prog: the command's name in usage and errors (``manage.py dim``, ``flask dim``).
    :param admin: makes the :class:`~dim.admin.Admin` every subcommand uses, for a command
        embedded in an application that knows its Redis and service (the Django and
        Flask integrations): the subcommands then take no connection option, and
        ``demo`` is left out.
    :param manager: makes the application's :class:`~dim.Manager`, for ``run`` (which
        then takes no TARGET); an embedded command without it has no ``run``.
    """
    epilog = (
        "Exit codes: 0 ok (settled, for status --check and wait), 1 not settled or a "
        "runtime failure, 2 bad arguments."
    )
    parser = _Parser(
        prog=prog,
        description="Look at a dim cluster, or run a demo of one."
        if admin is None
        else "Look at, steer or run this application's dim cluster.",
        epilog=epilog,
    )
    from dim import __version__

    parser.add_argument("--version", action="version", version=f"dim {__version__}")
    if admin is None:
        add_connection_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True)

    def target(sub: argparse.ArgumentParser, **options: Any) -> None:
        if admin is not None:
            sub.set_defaults(admin_factory=admin)
            return
        sub.set_defaults(admin_factory=None)
        add_connection_options(sub, top=False, **options)

    status = commands.add_parser(
        "status",
        help="show the nodes, leader and assignment of one service (read-only)",
        description="Show the nodes, leader, assignment and pending handoffs of one "
        "service. Only reads from Redis.",
    )
    target(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.add_argument(
        "--check",
        action="store_true",
        help="exit 1, with one line per problem on stderr, unless the cluster is settled "
        "(a leader, every config running where it is assigned)",
    )
    _nodes_option(status)
    status.set_defaults(func=cmd_status, parser=status)

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
    watch.set_defaults(func=cmd_watch, parser=watch)

    config = commands.add_parser(
        "config",
        help="show the configs the leader published, and where each is assigned (read-only)",
        description="Show every config as the leader last published it (its id, the node "
        "it is assigned to, the node holding its claim and its content).",
    )
    target(config)
    config.add_argument("--json", action="store_true", help="print JSON instead of a table")
    config.set_defaults(func=cmd_config, parser=config)

    rebalance = commands.add_parser(
        "rebalance",
        help="ask the leader to call get_config and re-plan now",
        description="Ask the leader to call get_config and re-plan now instead of at its "
        "next config poll. The assignment is sticky: only what is unbalanced or changed "
        "moves.",
    )
    target(rebalance)
    rebalance.set_defaults(func=cmd_rebalance, parser=rebalance)

    pause = commands.add_parser(
        "pause",
        help="stop all rebalancing until 'dim resume' (instances keep running and healing)",
        description="Pause rebalancing: the leader changes no assignment until 'dim "
        "resume'. Instances keep running where they are and unhealthy ones are still "
        "recreated in place, but the configs of a node that stops or dies wait, and new "
        "configs are not placed.",
    )
    target(pause)
    pause.set_defaults(func=cmd_pause, parser=pause, on=True)
    resume = commands.add_parser(
        "resume", help="end a 'dim pause'", description="Resume rebalancing after dim pause."
    )
    target(resume)
    resume.set_defaults(func=cmd_pause, parser=resume, on=False)

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
    drain.set_defaults(func=cmd_drain, parser=drain)

    wait = commands.add_parser(
        "wait",
        help="wait until the cluster is settled (a deploy gate): exit 1 if not in time",
        description="Wait until the cluster is settled: a leader, every config running on "
        "the live node it is assigned to (none running nowhere, none that cannot be placed, "
        "no handoff pending). Balance is not required. Exit 0 once settled, or 1 after "
        "--timeout with one line per remaining problem on stderr.",
    )
    target(wait)
    until = wait.add_mutually_exclusive_group(required=True)
    until.add_argument("--settled", action="store_true", help="wait until settled")
    wait.add_argument(
        "--timeout",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="give up after this long (default 60)",
    )
    _nodes_option(wait)
    wait.set_defaults(func=cmd_wait, parser=wait)
    # dim run (dim.cli.run): standalone it takes a TARGET, embedded it runs the app's manager
    if admin is None or manager is not None:
        what = (
            "this application's manager"
            if manager is not None
            else "TARGET, package.module:attribute (the current directory is on sys.path): "
            "a dim.Manager or a callable returning one"
        )
        run = commands.add_parser(
            "run",
            help="run a node in the foreground until SIGTERM or SIGINT (a dedicated worker)",
            description=f"Start {what}, log to stderr and run until SIGTERM or SIGINT, then "
            "leave the cluster gracefully and exit 0 (1 if it cannot start).",
        )
        if manager is None:
            run.add_argument("target", type=run_target, metavar="TARGET")
        run.add_argument(
            "--log-level",
            choices=["DEBUG", "INFO", "WARNING", "ERROR"],
            default="INFO",
            help="if the application configured no logging (default INFO)",
        )
        run.set_defaults(func=cmd_run, parser=run, manager_factory=manager, own_logging=True)

    if admin is not None:
        _hide(commands)
        return parser
    demo = commands.add_parser(
        "demo",
        help="run a scripted demo cluster of node processes",
        description="Start node processes on a private Redis (or --redis), print the "
        "cluster every second and run a short scenario: add a node, stop one gracefully "
        "(SIGTERM), kill one (SIGKILL). On a terminal, keys a (add), s (stop), k (kill) "
        "and q (quit) act at once, and the demo runs until --seconds or q; "
        "otherwise it ends with the scenario.",
    )
    target(
        demo,
        service=False,
        helps={"--redis": "use this Redis instead of starting a private one"},
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
    demo.set_defaults(func=cmd_demo, parser=demo)

    # Internal: one node of the demo, started by `dim demo` (no help: not listed).
    node = commands.add_parser("demo-node", description="One node of `dim demo` (internal).")
    target(node)
    node.add_argument("--configs", type=_int_between(1, 1000), required=True)
    node.set_defaults(func=cmd_demo_node, parser=node)
    _hide(commands)
    return parser


def _nodes_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--min-nodes",
        type=_int_between(0, 10**6),
        default=0,
        metavar="N",
        help="settled also needs at least N live nodes (default 0)",
    )


def _hide(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Leave the internal subcommands out of every list argparse prints."""
    commands.choices = _Commands(commands.choices or {}, INTERNAL)
