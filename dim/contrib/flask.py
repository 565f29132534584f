"""Flask integration: a ``Dim`` extension that runs one manager per process, and the
``flask dim`` command.

::

    from dim.contrib.flask import Dim

    dim_ext = Dim(get_config=load_feeds, create=Feed.open, disconnect=Feed.close)


    def create_app():
        app = Flask(__name__)
        app.config.update(DIM_REDIS_URL="redis://localhost:6379/0", DIM_SERVICE="feeds")
        dim_ext.init_app(app)
        return app

(Name the extension anything but ``dim``, which would hide the package.)

Every keyword of :class:`dim.Manager` is an option, given to ``Dim(...)``, as an
``app.config`` key (``DIM_`` and its upper-case name), or to ``init_app(...)``; each
source wins over the one before it. ``DIM_REDIS_URL`` (a URL or a ``redis.Redis``) and
``DIM_SERVICE`` are required, and so are ``get_config`` and ``create``. In
``app.config`` a callback may be a dotted path (``DIM_CREATE = "feeds.open"``) and
``DIM_SETTINGS`` a dict of :class:`dim.Settings` fields. ``DIM_TAGS``,
``DIM_CAPACITY``, ``DIM_REQUIRES``, ``DIM_PRIORITY``, ``DIM_NODE_NAME``, ``DIM_WEIGHT``
and ``DIM_KEY`` are the others (see :mod:`dim.contrib.options`); an unknown ``DIM_*`` key
is a :class:`~dim.ConfigError`.

``DIM_AUTOSTART``
    ``True`` (default, unless ``app.testing``): ``init_app`` starts the manager, with two
    exceptions. In a gunicorn process not yet known to be a worker (the master, with
    ``--preload``) it starts in each worker instead (:func:`dim.contrib.post_fork`, or
    that worker's first request). Under the ``flask`` command it starts at the first
    request, so ``flask shell`` or ``flask db upgrade`` never join the cluster, and with
    ``flask run --debug`` only the process that serves joins (not the reloader's
    watcher). ``False`` (default when ``app.testing``): only :meth:`Dim.start` starts it.

``init_app`` adds the ``flask dim`` command to ``app.cli``: ``flask dim status``,
``watch``, ``config``, ``pause``, ``resume``, ``drain``, ``rebalance``, ``wait``, on this
app's Redis and service, and ``flask dim run``, which runs this app's manager in the
foreground until SIGTERM (a dedicated worker: :mod:`dim.cli.run`). The manager stops when
the process exits normally (``atexit``) and, under gunicorn, in
:func:`dim.contrib.worker_exit`.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import click
from flask import Flask, current_app, has_app_context

from dim.admin import Admin
from dim.contrib import ProcessManager, post_fork, serving, worker_exit
from dim.contrib.options import MANAGER_OPTIONS, OptionReader, setting_name
from dim.errors import ConfigError, StateError
from dim.events import EventType, Listener
from dim.manager import Manager

__all__ = ["Dim", "post_fork", "worker_exit"]

_EXTENSION = "dim"
_PREFIX = "DIM_"


def _check_autostart(value: Any) -> Optional[str]:
    return None if isinstance(value, bool) else f"must be True or False, got {value!r}"


_READER = OptionReader(
    "app.config",
    prefix=_PREFIX,
    extra={"AUTOSTART": _check_autostart},
    missing_hint=" (or pass {option}= to Dim() or init_app())",
)


def _options(given: dict[str, Any], where: str) -> dict[str, Any]:
    """Keyword options (Manager names) as settings keys; an unknown one raises."""
    unknown = sorted(set(given) - set(MANAGER_OPTIONS))
    if unknown:
        raise ConfigError(
            f"{where} got unknown option {unknown[0]!r}; known: {sorted(MANAGER_OPTIONS)}",
            unknown[0],
        )
    return {setting_name(name): value for name, value in given.items() if value is not None}


class Dim:
    """Runs one :class:`dim.Manager` per process for a Flask app.

    :param app: initialise this app now (or call :meth:`init_app` later).
    :param options: any keyword of :class:`dim.Manager` (``get_config``, ``create``,
        ``tags``, ``capacity``, ...), for every app; ``app.config`` and ``init_app``
        override them.
    :raises ConfigError: an unknown option.

    One ``Dim`` keeps one manager per ``(DIM_REDIS_URL, DIM_SERVICE)``: calling
    ``init_app`` for several apps of one process (an app factory) reuses it, so the
    process joins the cluster once.

    Example::

        dim_ext = Dim(get_config=load_feeds, create=Feed.open, tags=["eu"])
        dim_ext.init_app(app)
        dim_ext.manager.instances  # what runs in this process
    """

    def __init__(self, app: Optional[Flask] = None, **options: Any) -> None:
        self._options = _options(options, "Dim()")
        self._managers: dict[tuple[str, str], ProcessManager] = {}
        self._listeners: list[tuple[Listener, tuple[EventType, ...]]] = []
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask, **options: Any) -> None:
        """Read the app's ``DIM_*`` config, add ``flask dim``, and start the manager (see
        ``DIM_AUTOSTART``).

        :param options: any keyword of :class:`dim.Manager`, for this app only.
        :raises ConfigError: an unknown, missing or invalid option.
        :raises RedisUnavailableError: ``DIM_AUTOSTART`` and Redis cannot be reached.
        """
        values = dict(self._options)
        values.update(
            (key[len(_PREFIX) :], value)
            for key, value in app.config.items()
            if key.startswith(_PREFIX)
        )
        values.update(_options(options, "init_app()"))
        kwargs = _READER.kwargs(values)
        redis, service = kwargs["redis"], kwargs["service"]
        key = (redis if isinstance(redis, str) else f"client-{id(redis)}", str(service))
        pm = self._managers.get(key)
        if pm is None:

            def build() -> Manager:
                return Manager(**kwargs)

            pm = ProcessManager(build, f"flask app {app.name!r}, service {service!r}")
            for callback, types in self._listeners:
                pm.add_listener(callback, *types)
            self._managers[key] = pm
        app.extensions[_EXTENSION] = pm
        app.before_request(_on_request)
        app.cli.add_command(_command(pm, redis, service))
        if values.get("AUTOSTART", not app.testing):
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

        Read ``dim_ext.manager.instances`` for what runs here, ``dim_ext.manager.lease(id)``
        in ``create`` for the fencing token.
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


def _command(pm: ProcessManager, redis: Any, service: str) -> click.Command:
    """``flask dim ...``: the ``dim`` command on this app's Redis, service and manager."""

    @click.command(
        "dim",
        context_settings={"ignore_unknown_options": True, "help_option_names": []},
        help="Look at, steer or run this app's dim cluster ('flask dim --help').",
    )
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    @click.pass_context
    def command(ctx: click.Context, args: tuple[str, ...]) -> None:
        from dim.cli import main  # the command line, only when asked for

        code = main(
            list(args),
            prog="flask dim",
            admin=lambda: Admin(redis, service),
            manager=pm.foreground,
        )
        ctx.exit(code)

    return command
