"""Django integration: an app that runs one manager per serving process, and the
``manage.py dim`` command.

Add the app to ``INSTALLED_APPS`` and configure it in ``settings.py``::

    INSTALLED_APPS = [..., "dim.contrib.django", "feeds"]  # or "dim.contrib.django.DimConfig"

    DIM = {
        "REDIS_URL": "redis://localhost:6379/0",  # or a redis.Redis
        "SERVICE": "feeds",
        "GET_CONFIG": "feeds.instances.get_config",  # dotted paths (or callables)
        "CREATE": "feeds.instances.create",
        "HEALTHCHECK": "feeds.instances.healthcheck",  # optional
        "DISCONNECT": "feeds.instances.disconnect",  # optional
        "SETTINGS": {"heartbeat_interval": 1.0},  # optional dim.Settings fields
        "AUTOSTART": None,  # see below
    }

Every keyword of :class:`dim.Manager` is a key, by its upper-case name (``redis`` is
``REDIS_URL``): ``TAGS``, ``CAPACITY``, ``REQUIRES``, ``PRIORITY``, ``NODE_NAME``,
``WEIGHT`` and ``KEY`` are the optional others (see :mod:`dim.contrib.options`). Django's
system checks report what is wrong in ``settings.DIM`` (``manage.py check``, ids
``dim.E001`` to ``dim.E006``: :mod:`dim.contrib.django.checks`); a mistake there does
not stop Django from loading, so ``migrate`` still runs, but no manager is built and
starting one raises the :class:`~dim.ConfigError`.

When the manager starts (``AUTOSTART``):

``None`` (default): when the process serves. Under gunicorn, at worker boot with the
    hooks of :mod:`dim.contrib` in ``gunicorn.conf.py`` (else at the worker's first
    request); under any other server, at the first request. Management commands
    (``migrate``, ``shell``, ``test``, ...) never start it: they serve no request.
``True``: in ``ready()``, in every process that loads Django, management commands
    included; a gunicorn process not yet known to be a worker (the master, with
    ``--preload``) still waits for its workers.
``False``: only when you call :func:`start`.

``manage.py dim`` is the ``dim`` command on ``settings.DIM``'s Redis and service
(``status``, ``watch``, ``config``, ``pause``, ``resume``, ``drain``, ``rebalance``,
``wait``), and ``manage.py dim run`` runs this project's manager in the foreground until
SIGTERM: a dedicated worker process (:mod:`dim.cli.run`).

Use :func:`manager` for this process's :class:`dim.Manager`. It stops at normal exit
(``atexit``) and in gunicorn's ``worker_exit`` hook.
"""

from __future__ import annotations

from dim.contrib import post_fork, worker_exit
from dim.contrib.django.apps import DimConfig
from dim.contrib.django.process import add_listener, manager, start, stop

__all__ = [
    "DimConfig",
    "add_listener",
    "manager",
    "post_fork",
    "start",
    "stop",
    "worker_exit",
]
