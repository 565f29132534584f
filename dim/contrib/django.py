"""Django integration: an app that runs one manager per serving process.

Add the app config to ``INSTALLED_APPS`` (the class path: this module is not a
package) and configure it in ``settings.py``::

    INSTALLED_APPS = [..., "dim.contrib.django.DimConfig", "feeds"]

    DIM = {
        "REDIS_URL": "redis://localhost:6379/0",  # or a redis.Redis
        "SERVICE": "feeds",
        "GET_CONFIG": "feeds.instances.get_config",  # dotted paths (or callables)
        "CREATE": "feeds.instances.create",
        "HEALTHCHECK": "feeds.instances.healthcheck",  # optional
        "DISCONNECT": "feeds.instances.disconnect",  # optional
        "KEY": None,
        "WEIGHT": 1.0,  # optional
        "SETTINGS": {"heartbeat_interval": 1.0},  # optional dim.Settings fields
        "AUTOSTART": None,  # see below
    }

When the manager starts (``AUTOSTART``):

``None`` (default): when the process serves. Under gunicorn, at worker boot with the
    hooks of :mod:`dim.contrib` in ``gunicorn.conf.py`` (else at the worker's first
    request); under any other server, at the first request. Management commands
    (``migrate``, ``shell``, ``test``, ...) never start it: they serve no request.
``True``: in ``ready()``, in every process that loads Django, management commands
    included; a gunicorn process not yet known to be a worker (the master, with
    ``--preload``) still waits for its workers.
``False``: only when you call :func:`start`.

Use :func:`manager` for this process's :class:`dim.Manager`. It stops at normal exit
(``atexit``) and in gunicorn's ``worker_exit`` hook.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from django.apps import AppConfig
from django.conf import settings as django_settings
from django.core.signals import request_started
from django.utils.module_loading import import_string

from dim.contrib import (
    ProcessManager,
    post_fork,
    serving,
    settings_from,
    under_gunicorn,
    worker_exit,
)
from dim.errors import ConfigError, StateError
from dim.events import EventType, Listener
from dim.manager import Manager

__all__ = [
    "DimConfig",
    "add_listener",
    "manager",
    "post_fork",
    "start",
    "stop",
    "worker_exit",
]

_KNOWN = frozenset(
    {
        "REDIS_URL",
        "SERVICE",
        "GET_CONFIG",
        "CREATE",
        "HEALTHCHECK",
        "DISCONNECT",
        "KEY",
        "WEIGHT",
        "SETTINGS",
        "AUTOSTART",
    }
)
_CALLABLES = {
    "GET_CONFIG": "get_config",
    "CREATE": "create",
    "HEALTHCHECK": "healthcheck",
    "DISCONNECT": "disconnect",
    "KEY": "key",
}

_process_manager: Optional[ProcessManager] = None


class DimConfig(AppConfig):  # type: ignore[misc]  # django ships no type hints
    """Builds the manager from ``settings.DIM`` in ``ready()`` and starts it (see module doc)."""

    name = "dim.contrib.django"
    label = "dim"
    verbose_name = "dim"

    def ready(self) -> None:
        global _process_manager
        options = _read_settings()
        if _process_manager is None:
            _process_manager = _build(options)
        request_started.connect(_on_request, dispatch_uid="dim.contrib.django")
        autostart = options.get("AUTOSTART")
        if autostart is None:
            if under_gunicorn():
                _process_manager.start()  # in the master this waits for the workers
            else:
                _process_manager.defer()
        elif autostart:
            _process_manager.start()


def _read_settings() -> dict[str, Any]:
    options = getattr(django_settings, "DIM", None)
    if not isinstance(options, dict):
        raise ConfigError(f"settings.DIM must be a dict, got {options!r}", options)
    unknown = sorted(set(options) - _KNOWN)
    if unknown:
        raise ConfigError(f"settings.DIM has unknown keys {unknown}; known: {sorted(_KNOWN)}")
    for name in ("REDIS_URL", "SERVICE", "GET_CONFIG", "CREATE"):
        if not options.get(name):
            raise ConfigError(f"settings.DIM[{name!r}] is required")
    autostart = options.get("AUTOSTART")
    if autostart is not None and not isinstance(autostart, bool):
        raise ConfigError(
            f"settings.DIM['AUTOSTART'] must be None, True or False, got {autostart!r}",
            autostart,
        )
    return options


def _resolve(options: dict[str, Any], name: str) -> Optional[Callable[..., Any]]:
    value = options.get(name)
    if value is None or callable(value):
        return value
    if not isinstance(value, str):
        raise ConfigError(
            f"settings.DIM[{name!r}] must be a dotted path or a callable, got {value!r}", value
        )
    try:
        found = import_string(value)
    except ImportError as exc:
        raise ConfigError(f"settings.DIM[{name!r}] = {value!r}: {exc}", value) from exc
    if not callable(found):
        raise ConfigError(f"settings.DIM[{name!r}] = {value!r} is not callable", value)
    return found  # type: ignore[no-any-return]


def _build(options: dict[str, Any]) -> ProcessManager:
    callbacks = {arg: _resolve(options, name) for name, arg in _CALLABLES.items()}
    settings = settings_from(options.get("SETTINGS"), "settings.DIM['SETTINGS']")
    weight = options.get("WEIGHT", 1.0)
    service = options["SERVICE"]

    def build() -> Manager:
        return Manager(
            callbacks["get_config"],  # type: ignore[arg-type]  # checked as required
            callbacks["create"],  # type: ignore[arg-type]
            callbacks["healthcheck"],
            callbacks["disconnect"],
            redis=options["REDIS_URL"],
            service=service,
            settings=settings,
            key=callbacks["key"],
            weight=weight,
        )

    return ProcessManager(build, f"django, service {service!r}")


def _on_request(**kwargs: Any) -> None:
    # a process that serves a request is a worker: start what waits for that
    serving()


def _required() -> ProcessManager:
    if _process_manager is None:
        raise StateError(
            "dim's Django app is not ready: add 'dim.contrib.django.DimConfig' to "
            "INSTALLED_APPS and configure settings.DIM"
        )
    return _process_manager


def manager() -> Manager:
    """This process's :class:`dim.Manager` (started or not)."""
    return _required().manager


def start() -> Optional[Manager]:
    """Start the manager now; None if deferred (a gunicorn process not yet a worker)."""
    return _required().start()


def stop() -> None:
    """Leave the cluster gracefully (done at exit anyway)."""
    _required().stop()


def add_listener(callback: Listener, *types: EventType) -> Listener:
    """Add an event listener; kept when a forked worker builds its own manager."""
    return _required().add_listener(callback, *types)
