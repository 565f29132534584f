"""``dim run``: one node in the foreground, a dedicated worker process.

``dim run package.module:attribute`` imports the module (the current directory is on
``sys.path``, as for gunicorn and celery), takes the attribute (a :class:`dim.Manager`,
or a callable returning one), starts it and runs until SIGTERM or SIGINT, then stops it
gracefully (every instance disconnected, the node gone from the cluster) and exits 0.
``manage.py dim run`` and ``flask dim run`` do the same with the application's manager.

Logging goes to stderr (``--log-level``, INFO by default) unless the application
configured logging itself (handlers on the root or the ``dim`` logger, looked at once the
target is loaded). A target that does not load, a start that fails (Redis unreachable, a
static node name in use) end the command with one line and exit code 1. The same signal
while the node stops ends the process at once: the claims it did not release then expire
after a ``lease``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from contextlib import AbstractContextManager
from typing import Any, Callable, Optional

import redis

from dim.cli.commands import CommandError, signals_set
from dim.errors import DimError
from dim.manager import Manager

__all__ = ["LOG_FORMAT", "ManagerFactory", "cmd_run", "load_target", "run", "run_target"]

log = logging.getLogger(__name__)

#: Makes the manager ``dim run`` starts: the application's (``manage.py dim run``, ``flask
#: dim run``) or the one a ``package.module:attribute`` target names.
ManagerFactory = Callable[[], Manager]

#: The format of the log lines ``dim run`` prints when the application configured none.
LOG_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


def run_target(text: str) -> str:
    """argparse type of TARGET: ``package.module:attribute`` (the attribute may be dotted)."""
    module, sep, attribute = text.partition(":")
    names = [*module.split("."), *attribute.split(".")]
    if not sep or not all(name.isidentifier() for name in names):
        raise argparse.ArgumentTypeError(
            f"TARGET must be package.module:attribute (a dim.Manager or a callable "
            f"returning one), got {text!r}"
        )
    return text


def load_target(text: str) -> Manager:
    """The manager a ``package.module:attribute`` target names (see :func:`run_target`).

    :raises CommandError: the module does not import, the attribute is missing, or it is
        neither a :class:`~dim.Manager` nor a callable returning one.
    """
    module_name, _, attribute = text.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)  # `dim run app:make` from the project's directory
    try:
        found: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise CommandError(
            f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from None
    for name in attribute.split("."):
        try:
            found = getattr(found, name)
        except AttributeError:
            raise CommandError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if isinstance(found, Manager):
        return found
    if not callable(found):
        raise CommandError(
            f"{text} ({type(found).__name__}) is not a dim.Manager nor a callable returning one"
        )
    try:
        made = found()
    except Exception as exc:
        raise CommandError(f"{text}() raised {type(exc).__name__}: {exc}") from None
    if not isinstance(made, Manager):
        raise CommandError(f"{text}() returned {made!r}, not a dim.Manager")
    return made


def cmd_run(args: argparse.Namespace) -> int:
    factory: Optional[ManagerFactory] = args.manager_factory
    target: Optional[str] = getattr(args, "target", None)
    if factory is None:
        assert target is not None  # the standalone parser requires it

        def factory() -> Manager:
            return load_target(target)

    return run(factory, log_level=args.log_level)


def run(factory: ManagerFactory, *, log_level: str = "INFO") -> int:
    """Start the factory's manager, wait for SIGTERM or SIGINT, stop it; the exit code.

    :raises CommandError: the manager could not be made or started.
    """
    stop = threading.Event()
    # installed first: a signal during a slow load or start is not lost, and the node
    # that start() may have joined still leaves gracefully
    with _stop_on_signals(stop) as received:
        manager = _make(factory)
        _configure_logging(log_level)
        if stop.is_set():
            log.info("%s before the node started: not joining", signal.Signals(received[0]).name)
            return 0
        try:
            manager.start()
        except (DimError, redis.RedisError) as exc:
            raise CommandError(str(exc)) from None
        log.info(
            "node %s of service %r runs in process %d; SIGTERM or SIGINT stops it",
            manager.node_id,
            manager.service,
            os.getpid(),
        )
        while not stop.wait(60.0):
            continue
        log.info(
            "%s: stopping node %s (up to %g s; the same signal again exits at once)",
            signal.Signals(received[0]).name,
            manager.node_id,
            manager.settings.stop_timeout,
        )
        manager.stop()
    return 0


def _make(factory: ManagerFactory) -> Manager:
    try:
        manager = factory()
    except CommandError:
        raise
    except DimError as exc:
        raise CommandError(str(exc)) from None
    except Exception as exc:
        raise CommandError(f"making the manager failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(manager, Manager):
        raise CommandError(f"the manager factory returned {manager!r}, not a dim.Manager")
    return manager


def _configure_logging(level: str) -> None:
    """Log to stderr, unless the application configured logging (root or ``dim``; the
    ``NullHandler`` dim puts on its logger does not count)."""
    configured = [
        handler
        for name in (None, "dim")
        for handler in logging.getLogger(name).handlers
        if not isinstance(handler, logging.NullHandler)
    ]
    if configured:
        return
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)


def _stop_on_signals(stop: threading.Event) -> AbstractContextManager[list[int]]:
    """While inside, SIGTERM and SIGINT set ``stop``; a second one ends the process."""

    def again(signum: int, received: list[int]) -> None:
        # the node is stopping and the operator insists (the same signal again): what
        # it did not release expires after a lease, as after a crash. Another kind of
        # signal is the same request delivered twice (a wrapper that forwards Ctrl-C
        # as SIGTERM too): ignored.
        if signum != received[0]:
            return
        os.write(2, f"dim run: {signal.Signals(signum).name} again: exiting now\n".encode())
        os._exit(128 + signum)

    # (kept once a signal came, the other kind ignored outright: the other signal of a
    # forwarded pair may arrive after the stop, even as the interpreter finalizes, and
    # is ignored then too rather than kill the process)
    return signals_set(stop, signal.SIGTERM, signal.SIGINT, again=again, keep=True)
