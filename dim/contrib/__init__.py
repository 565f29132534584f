"""Integrations with web frameworks and pre-fork servers.

* :mod:`dim.contrib.flask`: the ``Dim`` extension (``init_app``) and ``flask dim``.
* :mod:`dim.contrib.django`: the ``dim.contrib.django`` app, configured by ``settings.DIM``,
  and ``manage.py dim``.
* :mod:`dim.contrib.options`: the Manager's options as those settings hold them.
* gunicorn: :func:`post_fork` and :func:`worker_exit`, hooks for ``gunicorn.conf.py``::

      from dim.contrib import post_fork, worker_exit  # gunicorn finds the hooks by name

One rule holds for all of them: a manager runs in the process that serves requests, and
starts only after that process was forked. Threads do not survive ``fork()``, so a
manager started in gunicorn's master (``--preload`` imports the app there) would leave
every worker with a dead copy, and the master itself would run instances. So:

* Inside gunicorn (``SERVER_SOFTWARE`` is ``gunicorn/...`` and gunicorn is imported), a
  process is a *worker* once :func:`post_fork` ran in it, or once it served a request.
  Until then a start is *deferred*: it happens in :func:`post_fork` (at worker boot, with
  or without ``--preload``) or at the first request.
* Everywhere else a start happens at once.
* :func:`worker_exit` stops the worker's managers gracefully before it exits (SIGTERM to
  the master, ``max_requests``, a reload); at exit, any process that ends normally (or
  by ``sys.exit`` in a signal handler) does the same.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Mapping
from typing import Any, Callable, Optional

import attrs

from dim.errors import ConfigError
from dim.events import EventType, Listener
from dim.manager import Manager
from dim.settings import Settings

__all__ = [
    "ProcessManager",
    "in_prefork_parent",
    "post_fork",
    "serving",
    "settings_from",
    "stop_all",
    "under_gunicorn",
    "worker_exit",
]

log = logging.getLogger(__name__)


class _ProcessState:
    """What this process knows about itself; a forked child inherits, then updates it."""

    worker = False  # gunicorn's post_fork ran here, or this process served a request


_state = _ProcessState()
_registry_lock = threading.Lock()
_registry: list[ProcessManager] = []


def under_gunicorn() -> bool:
    """Whether this process belongs to a gunicorn server (its master or a worker)."""
    return (
        os.environ.get("SERVER_SOFTWARE", "").startswith("gunicorn/")
        and "gunicorn.arbiter" in sys.modules
    )


def in_prefork_parent() -> bool:
    """Whether starting a manager here now could be a start before a fork.

    True in a gunicorn process not yet known to be a worker: the master loading the app
    with ``--preload``, or a worker whose ``gunicorn.conf.py`` lacks :func:`post_fork` and
    that has served nothing yet.
    """
    return under_gunicorn() and not _state.worker


class ProcessManager:
    """One :class:`~dim.Manager` per process, started when this process may run it.

    ``build`` makes a new, unstarted manager. The first is built at once, so bad
    arguments fail where the app is configured; a process forked from the one that built
    it (and never started it) builds its own on first use, since a manager belongs to the
    process that made it.
    """

    def __init__(self, build: Callable[[], Manager], name: str) -> None:
        self._build = build
        self.name = name
        self._lock = threading.RLock()
        self._manager = build()
        self._pid = os.getpid()
        self._listeners: list[tuple[Listener, tuple[EventType, ...]]] = []
        #: a start was asked for and waits until this process is known to be a worker
        self.pending = False
        with _registry_lock:
            _registry.append(self)

    def __repr__(self) -> str:
        return f"<ProcessManager {self.name} pending={self.pending} {self._manager!r}>"

    @property
    def manager(self) -> Manager:
        """This process's manager (started or not)."""
        if self._pid == os.getpid():
            return self._manager
        with self._lock:
            if self._pid != os.getpid() and self._manager.node_id is None:
                # built, never started, before a fork: this process gets its own. (One
                # started before the fork is kept, so using it raises ForkedError.)
                manager = self._build()
                for callback, types in self._listeners:
                    manager.add_listener(callback, *types)
                self._manager = manager
                self._pid = os.getpid()
            return self._manager

    def add_listener(self, callback: Listener, *types: EventType) -> Listener:
        """Like :meth:`dim.Manager.add_listener`, and kept for a manager built after a fork."""
        with self._lock:
            self.manager.add_listener(callback, *types)
            self._listeners.append((callback, types))
        return callback

    def start(self) -> Optional[Manager]:
        """Start now, or defer until this process is a worker; the manager, or None.

        :raises RedisUnavailableError: as :meth:`dim.Manager.start`.
        """
        with self._lock:
            if in_prefork_parent():
                if not self.pending:
                    log.info(
                        "%s: gunicorn process %d is not a worker yet; the manager starts in "
                        "each worker (dim.contrib.post_fork in gunicorn.conf.py, or the "
                        "first request)",
                        self.name,
                        os.getpid(),
                    )
                self.pending = True
                return None
            manager = self.manager.start()
            self.pending = False
            return manager

    def defer(self) -> None:
        """Start when this process is known to serve (:func:`serving`, :func:`post_fork`)."""
        with self._lock:
            if self.manager.node_id is None:
                self.pending = True

    def foreground(self) -> Manager:
        """This process's manager, for a command that starts and stops it itself
        (``dim run``): no deferred start is left pending."""
        with self._lock:
            self.pending = False
            return self.manager

    def stop(self) -> None:
        """Stop gracefully (a no-op if not started, or if started by a parent process)."""
        with self._lock:
            self.pending = False
            manager = self._manager
        manager.stop()


def _registered() -> list[ProcessManager]:
    with _registry_lock:
        return list(_registry)


def serving() -> None:
    """Declare this process a serving worker, and start the managers deferred so far.

    The integrations call it at each request (cheap: a flag and a look at the few
    registered managers). A start that fails here is logged, not raised: the request is
    not dim's, and the next one tries again.
    """
    _state.worker = True
    for pm in _registered():
        if pm.pending:
            try:
                pm.start()
            except Exception:
                log.exception("%s: starting the manager failed; retrying at the next request", pm)


def post_fork(server: Any, worker: Any) -> None:
    """gunicorn hook: this process is a worker; start the managers deferred in the master.

    Put ``from dim.contrib import post_fork, worker_exit`` in ``gunicorn.conf.py``. With
    ``--preload`` the app (and its deferred manager) was loaded in the master, and starts
    here; without it the app loads after this hook, in this worker, and starts at once. A
    start that fails (Redis unreachable for ``connect_timeout``) raises, so gunicorn
    reports a worker that failed to boot.
    """
    _state.worker = True
    for pm in _registered():
        if pm.pending:
            pm.start()


def worker_exit(server: Any, worker: Any) -> None:
    """gunicorn hook: stop this worker's managers gracefully before the worker exits.

    gunicorn also calls it in the master for a worker that died; that call does nothing.
    """
    pid = getattr(worker, "pid", None)
    if pid is not None and pid != os.getpid():
        return
    stop_all()


def stop_all() -> None:
    """Stop every manager the integrations started in this process."""
    for pm in _registered():
        try:
            pm.stop()
        except Exception:
            log.exception("stopping %r failed", pm)


# Stop at exit from threading's exit hooks too: they run as soon as the main thread
# returns, before concurrent.futures shuts the thread pools down (after which an
# atexit-time stop() can no longer run the disconnects). Harmless when already stopped.
_register_threading_atexit = getattr(threading, "_register_atexit", None)
if _register_threading_atexit is not None:
    _register_threading_atexit(stop_all)


def settings_from(value: Any, where: str) -> Optional[Settings]:
    """``Settings`` from a mapping of its fields (or a ``Settings``, or None).

    :param where: names the setting in error messages, e.g. ``"DIM_SETTINGS"``.
    :raises ConfigError: not a mapping, an unknown field, or an invalid value.
    """
    if value is None or isinstance(value, Settings):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a dict of dim.Settings fields, got {value!r}", value)
    known = {field.name for field in attrs.fields(Settings)}
    unknown = sorted(str(name) for name in value if name not in known)
    if unknown:
        raise ConfigError(f"{where} has unknown settings {unknown}; known: {sorted(known)}", value)
    return Settings(**value)
