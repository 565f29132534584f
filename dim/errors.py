"""The exceptions dim raises.

Every exception dim raises on purpose derives from :class:`DimError`, and each subclass
also inherits the built-in exception it resembles, so ``except ValueError`` keeps working
for code that does not know dim.

Errors from redis-py (``redis.exceptions.ConnectionError``, ``TimeoutError``,
``ResponseError``...) do not pass through the public API: ``start()`` turns an
unreachable server or a refused login into :class:`RedisUnavailableError`, and the
background loops log them, report them to listeners and retry. ``Manager.status()`` and
the methods of :class:`dim.admin.Admin` let a ``redis.exceptions.RedisError`` through,
because each is a plain request that the caller made.
"""

from __future__ import annotations

from typing import Any


class DimError(Exception):
    """Root of every error dim raises."""


class ConfigError(DimError, ValueError):
    """A configuration, setting or argument is invalid.

    :ivar value: the offending value, when there is one.
    """

    def __init__(self, message: str, value: Any = None) -> None:
        super().__init__(message)
        self.value = value


class RedisUnavailableError(DimError, ConnectionError):
    """Redis could not be reached (or refused the login) within the connect timeout."""


class StateError(DimError, RuntimeError):
    """The manager was used in a state that does not allow the call.

    For example ``start()`` after ``stop()``, or any call on a manager that was started in
    a parent process and then inherited through ``fork()``.
    """


class ForkedError(StateError):
    """A started manager was inherited by a forked child process.

    Threads do not survive ``fork()``, so the child's copy would hold claims it never
    renews. Start managers after the fork (gunicorn: in ``post_fork`` or the app factory,
    not with ``--preload``).
    """


class CreateError(DimError, RuntimeError):
    """``create`` failed for a config (raised, returned None or timed out).

    :ivar config_id: the id of the config whose instance could not be created.
    """

    def __init__(self, message: str, config_id: Any = None) -> None:
        super().__init__(message)
        self.config_id = config_id


class CallTimeout(DimError, TimeoutError):
    """A user callback (create, healthcheck, disconnect, get_config) did not return in
    time."""


class CallbackError(DimError, RuntimeError):
    """A user callback raised a ``BaseException`` that is not an ``Exception``.

    ``asyncio.CancelledError``, ``SystemExit``, ``KeyboardInterrupt`` or gevent's
    ``GreenletExit`` coming out of ``create``, ``disconnect``, ``healthcheck``,
    ``get_config``, ``key`` or a placement rule is a failure of that call like any
    other: dim handles it as such and keeps the original as ``__cause__`` and
    :attr:`error`.
    """

    def __init__(self, message: str, error: BaseException) -> None:
        super().__init__(message)
        self.error = error


class MessageError(DimError, ValueError):
    """A pub/sub message is malformed, oversized or of an unknown kind."""
