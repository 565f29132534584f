"""The health loop: runs ``healthcheck`` on every local instance with a timeout (protocol.rst §9).

A check that raises, returns ``False`` or does not return within
``healthcheck_timeout`` marks the instance unhealthy: the reconciler disconnects it and
creates it again under the same claim (with the usual retries and hand-off).

A check that hangs for good costs one thread per config, not one per round: while a
config's check has not returned, no other check of that config starts. The instance it
was checking counts as timed out at every round; a newer instance of the config (the
one created after it was found unhealthy) is not checked until the hung call returns,
and a warning says so once.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Callable, Optional

from dim.errors import CallbackError, DimError
from dim.logs import NodeLog, fields
from dim.loop import Every, Loop
from dim.usercode import block_signals

if TYPE_CHECKING:
    from dim.node import Node
    from dim.slots import Slot

log = logging.getLogger(__name__)


class UnhealthyError(DimError, RuntimeError):
    """healthcheck returned False."""


class HealthLoop(Loop["Node"]):
    role = "health"

    def __init__(self, node: Node, healthcheck: Callable[[Any], Any]) -> None:
        super().__init__(node)
        self._log = NodeLog(log, node.node_id)
        self._healthcheck = healthcheck
        self._every = Every(node.settings.healthcheck_interval, node.clock)
        # checks still running from an earlier round (hung): claim key -> (token,
        # instance) of the incarnation being checked; no second check of that config
        # starts meanwhile (the token tells incarnations apart: ``create`` may return
        # the same object every time)
        self._busy: dict[str, tuple[Optional[int], Any]] = {}
        self._busy_lock = threading.Lock()
        self._round: Optional[threading.Event] = None  # set early when the node stops
        self._warned: set[str] = set()  # configs whose hung check was reported

    def wake(self) -> None:
        super().wake()
        current = self._round
        if current is not None and self.node.stop_event.is_set():
            current.set()  # stop() does not wait for the checks of this round

    def tick(self) -> float:
        if self._every.due():
            self._every.ran()
            self.check_all()
        return self._every.wait()

    def check_all(self) -> None:
        """Check every running instance at once; each check bounded by the timeout."""
        node = self.node
        running = node.reconciler.table.running()
        if not running:
            return
        results: dict[int, Optional[BaseException]] = {}
        done = threading.Event()
        lock = threading.Lock()

        def check(index: int, ckey: str, entry: tuple[Optional[int], Any]) -> None:
            instance = entry[1]
            block_signals()
            error: Optional[BaseException] = None
            try:
                if self._healthcheck(instance) is False:
                    error = UnhealthyError("healthcheck returned False")
            except Exception as exc:
                error = exc
            except BaseException as exc:  # CancelledError, SystemExit...: unhealthy too
                error = CallbackError(f"healthcheck raised {exc!r}", exc)
                error.__cause__ = exc
            with self._busy_lock:
                if self._busy.get(ckey) is entry:
                    del self._busy[ckey]
            with lock:
                results[index] = error
                if len(results) + len(skipped) == len(running):
                    done.set()

        skipped: set[int] = set()  # no check started for these (under lock)
        for index, (slot, instance) in enumerate(running):
            entry = (slot.token, instance)
            with self._busy_lock:
                hung = self._busy.get(slot.ckey)
                if hung is None:
                    self._busy[slot.ckey] = entry
            if hung is not None:
                # its last check has not returned: that incarnation counts as timed out;
                # a newer one of the config waits for the hung call to return
                if hung[0] != slot.token or hung[1] is not instance:
                    with lock:
                        skipped.add(index)
                    if slot.ckey not in self._warned:
                        self._warned.add(slot.ckey)
                        self._log.warning(
                            "healthcheck of config %r hangs (on an earlier instance): its "
                            "instance is not checked until that call returns",
                            slot.config.id,
                            extra=fields(config=slot.config.id, token=slot.token),
                        )
                continue
            self._warned.discard(slot.ckey)
            try:
                threading.Thread(
                    target=check,
                    args=(index, slot.ckey, entry),
                    daemon=True,
                    name=f"dim-healthcheck-{node.node_id}",
                ).start()
            except Exception:  # no thread to spare: no verdict this round
                with self._busy_lock:
                    del self._busy[slot.ckey]
                with lock:
                    skipped.add(index)
        timeout = node.settings.healthcheck_timeout
        self._round = done
        with lock:
            if len(results) + len(skipped) == len(running):
                done.set()
        if not node.stop_event.is_set():
            done.wait(timeout)
        self._round = None
        if node.stop_event.is_set():
            return
        with lock:
            finished = dict(results)
        for index, (slot, instance) in enumerate(running):
            if index in skipped:
                continue
            if index in finished:
                error = finished[index]
            else:
                error = TimeoutError(f"healthcheck did not return within {timeout:g} s")
            if error is None:
                self._mark_healthy(slot, instance)
            else:
                self._log.warning(
                    "instance of config %r is unhealthy: %r",
                    slot.config.id,
                    error,
                    extra=fields(config=slot.config.id, token=slot.token),
                )
                node.reconciler.unhealthy(slot, instance, error)

    def _mark_healthy(self, slot: Slot, instance: Any) -> None:
        if slot.instance is instance:
            slot.healthy = True
