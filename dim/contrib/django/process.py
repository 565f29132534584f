"""This process's manager, built from ``settings.DIM`` when Django is ready.

The one owner of the Django integration's state: the :class:`~dim.contrib.ProcessManager`
(or, when ``settings.DIM`` is wrong, the error that says why there is none). The public
functions are re-exported by :mod:`dim.contrib.django`; ``apps.py`` calls :func:`setup`
and ``manage.py dim`` calls :func:`admin` and :func:`foreground`.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Optional

from django.conf import settings as django_settings
from django.core.signals import request_started

from dim.admin import Admin
from dim.contrib import ProcessManager, serving, under_gunicorn
from dim.contrib.options import OptionReader
from dim.errors import ConfigError, StateError
from dim.events import EventType, Listener
from dim.manager import Manager

__all__ = ["READER", "add_listener", "admin", "foreground", "manager", "setup", "start", "stop"]

log = logging.getLogger(__name__)


def _check_autostart(value: Any) -> Optional[str]:
    if value is None or isinstance(value, bool):
        return None
    return f"must be None, True or False, got {value!r}"


#: ``settings.DIM``: every :class:`~dim.Manager` option, and ``AUTOSTART``.
READER = OptionReader("settings.DIM", extra={"AUTOSTART": _check_autostart})


class _State:
    """The process's manager, or why there is none (settings.DIM is wrong)."""

    process_manager: Optional[ProcessManager] = None
    error: Optional[ConfigError] = None


_state = _State()


def _dim_settings() -> Any:
    return getattr(django_settings, "DIM", None)


def setup() -> None:
    """Build the manager from ``settings.DIM`` and start it as ``AUTOSTART`` says.

    Wrong settings raise only under gunicorn (a server must not run without its
    instances); elsewhere ``manage.py migrate`` or ``check`` must still run, and the
    system checks report the problem. Starting the manager then raises it.
    """
    if _state.process_manager is not None:
        return
    options = _dim_settings()
    try:
        kwargs = READER.kwargs(options)
    except ConfigError as exc:
        _state.error = exc
        log.debug("settings.DIM is wrong, no manager: %s", exc)
        if under_gunicorn():
            raise
        return
    service = kwargs["service"]

    def build() -> Manager:
        return Manager(**kwargs)

    pm = ProcessManager(build, f"django, service {service!r}")
    _state.process_manager = pm
    request_started.connect(_on_request, dispatch_uid="dim.contrib.django")
    autostart = options.get("AUTOSTART")
    if autostart is None:
        if under_gunicorn():
            pm.start()  # in the master this waits for the workers
        else:
            pm.defer()
    elif autostart and sys.argv[1:2] == ["dim"]:
        # `manage.py dim ...` looks at the cluster (and `dim run` starts this manager
        # itself): a deploy gate must not join the cluster it waits for
        pm.defer()
    elif autostart:
        pm.start()


def _on_request(**kwargs: Any) -> None:
    # a process that serves a request is a worker: start what waits for that
    serving()


def _required() -> ProcessManager:
    if _state.error is not None:
        raise ConfigError(str(_state.error), _state.error.value)
    if _state.process_manager is None:
        raise StateError(
            "dim's Django app is not ready: add 'dim.contrib.django' to INSTALLED_APPS "
            "and configure settings.DIM"
        )
    return _state.process_manager


def manager() -> Manager:
    """This process's :class:`dim.Manager` (started or not).

    :raises ConfigError: ``settings.DIM`` is wrong (``manage.py check`` says how).
    """
    return _required().manager


def start() -> Optional[Manager]:
    """Start the manager now; None if deferred (a gunicorn process not yet a worker).

    :raises ConfigError: ``settings.DIM`` is wrong.
    :raises RedisUnavailableError: as :meth:`dim.Manager.start`.
    """
    return _required().start()


def stop() -> None:
    """Leave the cluster gracefully (done at exit anyway)."""
    if _state.process_manager is not None:
        _state.process_manager.stop()


def add_listener(callback: Listener, *types: EventType) -> Listener:
    """Add an event listener; kept when a forked worker builds its own manager.

    With wrong settings it does nothing (there is no manager to listen to), so that an
    app's ``ready()`` calling it does not stop ``manage.py check`` from reporting them.
    """
    if _state.error is not None:
        return callback
    return _required().add_listener(callback, *types)


def foreground() -> Manager:
    """The manager for ``manage.py dim run``: the one ``AUTOSTART`` may have started
    already, so the process runs one node either way."""
    return _required().foreground()


def admin() -> Admin:
    """An :class:`~dim.admin.Admin` on ``settings.DIM``'s Redis and service (for
    ``manage.py dim``): a mistake elsewhere in ``settings.DIM`` does not stop it."""
    options = _dim_settings()
    if not isinstance(options, dict):
        raise ConfigError(f"settings.DIM must be a dict, got {options!r}", options)
    for key in ("REDIS_URL", "SERVICE"):
        if not options.get(key):
            raise ConfigError(f"{READER.name(key)} is required", key)
    return Admin(options["REDIS_URL"], options["SERVICE"])
