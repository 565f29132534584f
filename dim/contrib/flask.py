"""Flask integration: a ``Dim`` extension that runs one manager per process.

::

    from dim.contrib.flask import Dim

    dim = Dim(get_config=load_feeds, create=Feed.open, disconnect=Feed.close)


    def create_app():
        app = Flask(__name__)
        app.config.update(DIM_REDIS_URL="redis://localhost:6379/0", DIM_SERVICE="feeds")
        dim.init_app(app)
        return app

Configuration (``app.config``):

``DIM_REDIS_URL``
    A URL (``redis://``, ``rediss://``, ``unix://``) or a ``redis.Redis``; required.
``DIM_SERVICE``
    The service name; required.
``DIM_SETTINGS``
    Optional dict of :class:`dim.Settings` fields, e.g. ``{"heartbeat_interval": 0.5}``.
``DIM_AUTOSTART``
    ``True`` (default): ``init_app`` starts the manager, with two exceptions. In a
    gunicorn process not yet known to be a worker (the master, with ``--preload``) it
    starts in each worker instead (:func:`dim.contrib.post_fork`, or that worker's first
    request). Under the ``flask`` command it starts at the first request, so ``flask
    shell`` or ``flask db upgrade`` never join the cluster, and with ``flask run
    --debug`` only the process that serves joins (not the reloader's watcher).
    ``False``: only :meth:`Dim.start` starts it (for instance in a testing config).

The callbacks (``get_config``, ``create``, ``healthcheck``, ``disconnect``, and ``key``,
``weight``) go to the constructor or to ``init_app`` (which wins). The manager stops when
the process exits normally (``atexit``) and, under gunicorn, in
:func:`dim.contrib.worker_exit`.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

from flask import Flask, current_app, has_app_context

from dim.contrib import ProcessManager, post_fork, serving, settings_from, worker_exit
from dim.errors import ConfigError, StateError
from dim.events import EventType, Listener
from dim.manager import Manager

__all__ = ["Dim", "post_fork", "worker_exit"]

_EXTENSION = "dim"


class Dim:
    """Runs one :class:`dim.Manager` per process for a Flask app.

    One ``Dim`` keeps one manager per ``(DIM_REDIS_URL, DIM_SERVICE)``: calling
    ``init_app`` for several apps of one process (an app factory) reuses it, so the
    process joins the cluster once.
    """

    def __init__(
        self,
        app: Optional[Flask] = None,
        *,
        get_config: Optional[Callable[[], Any]] = None,
        create: Optional[Callable[[Any], Any]] = None,
        healthcheck: Optional[Callable[[Any], Any]] = None,
        disconnect: Optional[Callable[[Any], Any]] = None,
        key: Optional[Callable[[Any], Any]] = None,
        weight: float = 1.0,
    ) -> None:
        self._callbacks: dict[str, Any] = {
            "get_config": get_config,
            "create": create,
            "healthcheck": healthcheck,
            "disconnect": disconnect,
            "key": key,
        }
        self._weight = weight
        self._managers: dict[tuple[str, str], ProcessManager] = {}
        self._listeners: list[tuple[Listener, tuple[EventType, ...]]] = []
        if app is not None:
            self.init_app(app)

    def init_app(
        self,
        app: Flask,
        *,
        get_config: Optional[Callable[[], Any]] = None,
        create: Optional[Callable[[Any], Any]] = None,
        healthcheck: Optional[Callable[[Any], Any]] = None,
        disconnect: Optional[Callable[[Any], Any]] = None,
        key: Optional[Callable[[Any], Any]] = None,
        weight: Optional[float] = None,
    ) -> None:
        """Read the app's ``DIM_*`` config, and start the manager (see ``DIM_AUTOSTART``).

        :raises ConfigError: a missing or invalid setting or callback.
        :raises RedisUnavailableError: ``DIM_AUTOSTART`` and Redis cannot be reached.
        """
        config = app.config
        for name in ("DIM_REDIS_URL", "DIM_SERVICE"):
            if not config.get(name):
                raise ConfigError(f"app.config[{name!r}] is required by dim's Flask extension")
        redis = config["DIM_REDIS_URL"]
        service = config["DIM_SERVICE"]
        settings = settings_from(config.get("DIM_SETTINGS"), "app.config['DIM_SETTINGS']")
        callbacks = dict(self._callbacks)
        given = {
            "get_config": get_config,
            "create": create,
            "healthcheck": healthcheck,
            "disconnect": disconnect,
            "key": key,
        }
        callbacks.update({name: value for name, value in given.items() if value is not None})
        for name in ("get_config", "create"):
            if callbacks[name] is None:
                raise ConfigError(
                    f"dim's Flask extension needs {name}: pass it to Dim() or init_app()"
                )
        chosen_weight = self._weight if weight is None else weight
        key_ = (redis if isinstance(redis, str) else f"client-{id(redis)}", str(service))
        pm = self._managers.get(key_)
        if pm is None:

            def build() -> Manager:
                return Manager(
                    callbacks["get_config"],
                    callbacks["create"],
                    callbacks["healthcheck"],
                    callbacks["disconnect"],
                    redis=redis,
                    service=service,
                    settings=settings,
                    key=callbacks["key"],
                    weight=chosen_weight,
                )

            pm = ProcessManager(build, f"flask app {app.name!r}, service {service!r}")
            for callback, types in self._listeners:
                pm.add_listener(callback, *types)
            self._managers[key_] = pm
        app.extensions[_EXTENSION] = pm
        app.before_request(_on_request)
        if config.get("DIM_AUTOSTART", True):
            if os.environ.get("FLASK_RUN_FROM_CLI") == "true":
                pm.defer()  # a `flask` command: join only if it serves (`flask run`)
            else:
                pm.start()

    # -- the manager of this process -------------------------------------------------------

    def _process_manager(self) -> ProcessManager:
        if has_app_context():
            pm = current_app.extensions.get(_EXTENSION)
            if isinstance(pm, ProcessManager):
                return pm
        if len(self._managers) == 1:
            return next(iter(self._managers.values()))
        if not self._managers:
            raise StateError("dim's Flask extension is not initialised: call init_app(app)")
        raise StateError(
            "this Dim drives several managers (one per DIM_REDIS_URL and DIM_SERVICE); "
            "use it inside an app context to pick one"
        )

    @property
    def manager(self) -> Manager:
        """The :class:`dim.Manager` of this process (of the current app, if several).

        Read ``ext.manager.instances`` for what runs here, ``ext.manager.lease(id)`` in
        ``create`` for the fencing token.
        """
        return self._process_manager().manager

    def start(self) -> Optional[Manager]:
        """Start the manager now (``DIM_AUTOSTART = False``); None if deferred to a worker."""
        return self._process_manager().start()

    def stop(self) -> None:
        """Leave the cluster gracefully (done at exit anyway)."""
        for pm in self._managers.values():
            pm.stop()

    def add_listener(self, callback: Listener, *types: EventType) -> Listener:
        """Add an event listener to the manager(s); kept when a worker builds its own."""
        self._listeners.append((callback, types))
        for pm in self._managers.values():
            pm.add_listener(callback, *types)
        return callback


def _on_request() -> None:
    # a process that serves a request is a worker: start what waits for that
    serving()
