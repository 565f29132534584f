"""The ``dim`` command: look at a cluster, gate a deploy on it, steer it, or watch a
demo one heal itself.

``dim status`` prints what Redis knows about one service (nodes, leader, assignment,
handoffs in progress) and only ever reads; with ``--check`` it also exits 1 unless the
cluster is settled, and ``dim wait --settled`` waits until it is (a deploy gate).
``dim demo`` starts a private Redis and a few node processes and runs a short scripted
scenario (a node joins, one leaves gracefully, one is killed) while it prints the
cluster every second. ``dim run module:factory`` runs one node in the foreground, a
dedicated worker process. ``python -m dim`` is the same command.

User errors never print a traceback: a bad argument (or environment variable) exits
with 2, and a runtime failure (Redis unreachable, a refused login) exits with 1, each
with one line on stderr; a cluster that is not settled exits with 1 too, with one line
per problem.

The package: :mod:`~dim.cli.parser` (the arguments), :mod:`~dim.cli.target` (the
connection options and their environment variables), :mod:`~dim.cli.commands` (each
subcommand, a thin layer over :class:`dim.admin.Admin`), :mod:`~dim.cli.formatting`
(the text it prints), :mod:`~dim.cli.run` (``dim run``) and :mod:`~dim.cli.demo`
(``dim demo`` and its node processes).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import Optional

from dim.cli.commands import (
    DEFAULT_REDIS_URL,
    REDIS_URL_ENV,
    SERVICE_ENV,
    AdminFactory,
    CommandError,
    UsageError,
    connect,
    describe_redis_error,
)
from dim.cli.demo import DEMO_SETTINGS
from dim.cli.formatting import format_status
from dim.cli.parser import build_parser
from dim.cli.run import ManagerFactory

__all__ = [
    "DEFAULT_REDIS_URL",
    "DEMO_SETTINGS",
    "REDIS_URL_ENV",
    "SERVICE_ENV",
    "AdminFactory",
    "CommandError",
    "ManagerFactory",
    "UsageError",
    "build_parser",
    "connect",
    "describe_redis_error",
    "format_status",
    "main",
]


def main(
    argv: Optional[Sequence[str]] = None,
    *,
    prog: str = "dim",
    admin: Optional[AdminFactory] = None,
    manager: Optional[ManagerFactory] = None,
) -> int:
    """Run the ``dim`` command; returns the exit code (the console script exits with it).

    ``prog``, ``admin`` and ``manager`` embed the command in an application (``manage.py
    dim``, ``flask dim``): see :func:`~dim.cli.parser.build_parser`.
    """
    parser = build_parser(prog=prog, admin=admin, manager=manager)
    args = parser.parse_args(argv)
    if not getattr(args, "own_logging", False):  # (dim run configures its own)
        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(levelname)s: %(message)s")
    command: str = args.parser.prog
    try:
        code: int = args.func(args)
    except UsageError as exc:
        args.parser.error(str(exc))
    except CommandError as exc:
        _error(f"{command}: {exc}")
        return 1
    except KeyboardInterrupt:
        _error(f"{command}: interrupted")
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
