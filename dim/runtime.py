"""Refuse to start where dim's threads would not be threads.

dim bounds every user callback with a timeout by running it on a thread of its own and
waiting with a deadline; its heartbeat keeps leases alive while a callback runs. Both
need real OS threads that the interpreter switches between. They are not:

* under gevent or eventlet after ``monkey.patch_all()``: ``threading`` makes greenlets,
  so a callback that blocks without yielding (CPU work, a C library) stops every
  heartbeat, the node's leases lapse, and its configs start elsewhere while they still
  run here;
* under uWSGI without ``enable-threads`` (or ``threads``): threads an app starts never
  run.

And under uWSGI without ``lazy-apps``, the app is loaded in the master, which then
forks the workers: a manager started at import runs in the master and every worker gets
a dead copy (:mod:`dim.contrib` explains the same rule for gunicorn).

:func:`check` finds these at :meth:`dim.Manager.start` and raises a
:class:`~dim.errors.ConfigError` that says what to do instead.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from dim.errors import ConfigError

__all__ = ["check", "green_threads", "uwsgi_problem"]

_INSTEAD = (
    "run dim in a process of real threads: a dedicated worker ('dim run "
    "package.module:factory'), or gunicorn's sync or gthread workers"
)


def green_threads() -> Optional[str]:
    """``"gevent"`` or ``"eventlet"`` when it monkey-patched ``threading``, else None."""
    gevent: Any = sys.modules.get("gevent.monkey")
    if gevent is not None and gevent.is_module_patched("threading"):
        return "gevent"
    eventlet: Any = sys.modules.get("eventlet.patcher")
    if eventlet is not None and eventlet.is_monkey_patched("thread"):
        return "eventlet"
    # a gunicorn gevent or eventlet worker patches only after its post_fork hook (where
    # dim.contrib.post_fork starts the managers): its worker class is imported already
    for module, name in (
        ("gunicorn.workers.ggevent", "gevent"),
        ("gunicorn.workers.geventlet", "eventlet"),
    ):
        if module in sys.modules and "gunicorn.arbiter" in sys.modules:
            return name
    return None


def uwsgi_problem() -> Optional[str]:
    """What stops a manager from running in this uWSGI process, or None (also when this
    is not uWSGI)."""
    uwsgi: Any = sys.modules.get("uwsgi")
    opt = getattr(uwsgi, "opt", None)
    if not isinstance(opt, dict):
        return None
    if not (_option(opt, "enable-threads") or _option(opt, "threads")):
        return (
            "uWSGI runs no thread an application starts unless it is given enable-threads "
            "= true (or threads = N): dim's heartbeat would never run"
        )
    if _option(opt, "master") and not (_option(opt, "lazy-apps") or _option(opt, "lazy")):
        worker = getattr(uwsgi, "worker_id", lambda: 1)()
        if worker == 0:
            return (
                "uWSGI loads the application in the master and then forks the workers "
                "unless it is given lazy-apps = true: a manager started now would run in "
                "the master, and each worker would get a dead copy"
            )
    return None


def _option(opt: dict[Any, Any], name: str) -> bool:
    """Whether a uWSGI option is on: its last value (a list when given twice), as bytes
    or str, in any case."""
    value = opt.get(name, opt.get(name.encode()))
    if isinstance(value, list):
        value = value[-1] if value else None
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if isinstance(value, str):
        value = value.strip().lower()
    return value not in (None, False, "", "0", "false", "no", "off", "n")


def check() -> None:
    """Raise :class:`~dim.errors.ConfigError` if dim cannot run in this process (see the
    module docstring); called by :meth:`dim.Manager.start`."""
    green = green_threads()
    if green is not None:
        raise ConfigError(
            f"dim cannot run in a process that {green} monkey-patched: its threads are "
            f"greenlets there, so a callback that blocks without yielding stops the "
            f"heartbeat, the leases lapse and a config can run twice; {_INSTEAD}",
            green,
        )
    problem = uwsgi_problem()
    if problem is not None:
        raise ConfigError(f"dim cannot start here: {problem}", problem)
