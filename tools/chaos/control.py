"""The node's control file: faults in user callbacks, asked for by the harness.

The harness (or a test) replaces a small JSON file (:func:`write_control`); each node
re-reads it when it changed (:class:`Control`) and makes its callbacks fail, hang, slow
down or raise as it says, or steps its process's wall clock (:func:`set_wall_offset`).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Optional, Union

from tools.chaos.ledger import Record

__all__ = [
    "BASE_EXCEPTIONS",
    "Control",
    "ControlledError",
    "GreenletExit",
    "make_base_exception",
    "set_wall_offset",
    "write_control",
]


def write_control(path: Union[str, os.PathLike[str]], **fields: Any) -> None:
    """Replace the control file atomically (the nodes re-read it when it changes).

    Fields: ``get_config_error`` (bool); ``create_fail``, ``unhealthy`` and
    ``healthcheck_hang`` are rules ``{"ids": [config ids], "pids": [pids] or None}``
    (None: every node); ``healthcheck_hang`` also takes ``"seconds"``. A rule without
    ``"ids"`` (or with ``"ids": None``) applies to every config.

    * ``create_delay`` and ``disconnect_delay``: rules with ``"seconds"``: ``create``
      (after its ``create`` line) or ``disconnect`` (before its ``disconnect`` line)
      waits that long. A delayed call also writes ``created`` (when ``create``
      returns) or ``disconnecting`` (when ``disconnect`` is called) lines.
    * ``configs``: how many configs ``get_config`` returns from now on (default: the
      node's ``--configs``).
    * ``wall_offset``: seconds added to this process's wall clock as Python reads it
      (``time.time`` and ``datetime.datetime.now/utcnow/today``; the monotonic clock is
      untouched), to step the wall clock without libfaketime. Applied within ~50 ms of
      the change; the node writes an ``ev: "wall_offset"`` line once it has. A number
      applies to every node; a rule ``{"pids": [...], "seconds": s}`` to those only
      (the others go back to 0).
    * ``raise``: ``{callback: rule}`` where callback is ``create``, ``disconnect``,
      ``healthcheck`` or ``get_config`` and the rule (``ids``/``pids`` as above) has
      ``"exc"``: one of :data:`BASE_EXCEPTIONS` (``CancelledError``, ``SystemExit``,
      ``KeyboardInterrupt``, ``GreenletExit``), raised from that callback. A raising
      ``create`` writes a ``create_error`` line (no instance); a raising
      ``disconnect`` writes ``disconnecting`` and then its ``disconnect`` line (the
      instance is gone: the call is over) before it raises.
    * ``get_config_hang``: ``{"seconds": s, "pids": ...}``: ``get_config`` blocks that
      long (it writes ``get_config`` with ``"hang": s`` when called and
      ``get_config_return`` when it returns).
    * ``log_get_config``: every ``get_config`` call writes a ``get_config`` line.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}")
    tmp.write_text(json.dumps(fields, sort_keys=True))
    os.replace(tmp, target)


class Control:
    """The node's view of the control file, re-read only when the file changed."""

    def __init__(self, path: Optional[str]) -> None:
        self.path = path
        self._key: Optional[tuple[int, int, int]] = None
        self._data: Record = {}
        self._lock = threading.Lock()
        self.pid = os.getpid()

    def current(self) -> Record:
        if self.path is None:
            return {}
        with self._lock:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                self._key, self._data = None, {}
                return self._data
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            if key != self._key:
                try:
                    data = json.loads(Path(self.path).read_text())
                except (OSError, ValueError):
                    return self._data  # replaced under us: keep the last good one
                self._key = key
                self._data = data if isinstance(data, dict) else {}
            return self._data

    def rule(self, name: str, config_id: Any) -> Optional[Record]:
        """The rule ``name`` if it applies to this config in this process."""
        return self._applies(self.current().get(name), config_id)

    def raising(self, callback: str, config_id: Any = None) -> Optional[BaseException]:
        """The exception the ``raise`` rule of ``callback`` asks for here, if any."""
        rules = self.current().get("raise")
        if not isinstance(rules, dict):
            return None
        rule = self._applies(rules.get(callback), config_id)
        if rule is None:
            return None
        return make_base_exception(str(rule.get("exc", "SystemExit")), callback)

    def wall_offset(self) -> float:
        value = self.current().get("wall_offset")
        if isinstance(value, dict):
            pids = value.get("pids")
            if pids is not None and self.pid not in pids:
                return 0.0
            value = value.get("seconds")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return 0.0
        return float(value)

    def _applies(self, rule: Any, config_id: Any) -> Optional[Record]:
        if not isinstance(rule, dict):
            return None
        ids = rule.get("ids")
        if ids is not None and config_id not in ids:
            return None
        pids = rule.get("pids")
        if pids is not None and self.pid not in pids:
            return None
        return rule


class ControlledError(RuntimeError):
    """A failure the control file asked for."""


class GreenletExit(BaseException):
    """Like gevent's ``GreenletExit``: a ``BaseException`` that is not an ``Exception``."""


#: What a ``raise`` rule may ask a callback to raise (none is an ``Exception``).
BASE_EXCEPTIONS: tuple[str, ...] = (
    "CancelledError",
    "SystemExit",
    "KeyboardInterrupt",
    "GreenletExit",
)


def make_base_exception(name: str, where: str) -> BaseException:
    """A fresh exception of kind ``name`` (see :data:`BASE_EXCEPTIONS`)."""
    if name == "CancelledError":
        return asyncio.CancelledError(f"{where} cancelled (control file)")
    if name == "KeyboardInterrupt":
        return KeyboardInterrupt(f"{where} interrupted (control file)")
    if name == "GreenletExit":
        return GreenletExit(f"{where} killed (control file)")
    return SystemExit(f"{where} exits (control file)")


_wall: dict[str, float] = {}


def set_wall_offset(offset: float) -> None:
    """Run this process's wall clock ``offset`` seconds off, as Python code reads it.

    The first call replaces ``time.time`` and ``datetime.datetime`` (with a subclass
    whose ``now``/``utcnow``/``today`` add the offset); later calls change the offset.
    Code that bound the originals before (``from time import time``) is not affected,
    nor is the monotonic clock. libfaketime cannot do this: it breaks the sleeps of
    Python 3.11+.
    """
    import datetime as dt

    first = "offset" not in _wall
    _wall["offset"] = offset
    if first:
        real_time = time.time
        real_datetime = dt.datetime

        def shifted_time() -> float:
            return real_time() + _wall["offset"]

        class ShiftedDatetime(dt.datetime):
            @classmethod
            def now(cls, tz: Any = None) -> Any:
                return real_datetime.now(tz) + dt.timedelta(seconds=_wall["offset"])

            @classmethod
            def utcnow(cls) -> Any:
                return real_datetime.utcnow() + dt.timedelta(seconds=_wall["offset"])

            @classmethod
            def today(cls) -> Any:
                return real_datetime.today() + dt.timedelta(seconds=_wall["offset"])

        time.time = shifted_time
        dt.datetime = ShiftedDatetime  # type: ignore[misc]
