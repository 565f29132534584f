"""The health loop: runs ``healthcheck`` on every local instance with a timeout (§4.7).

A check that raises, returns ``False`` or does not return within
``healthcheck_timeout`` marks the instance unhealthy: the reconciler disconnects it and
creates it again under the same claim (with the usual retries and hand-off).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Callable, Optional

from dim.errors import CallbackError, DimError
from dim.loop import Every, Loop
from dim.usercode import block_signals

if TYPE_CHECKING:
    from dim.node import Node
    from dim.reconciler import Slot

log = logging.getLogger(__name__)


class UnhealthyError(DimError, RuntimeError):
    """healthcheck returned False."""


class HealthLoop(Loop):
    role = "health"

    def __init__(self, node: Node, healthcheck: Callable[[Any], Any]) -> None:
        super().__init__(node)
        self._healthcheck = healthcheck
        self._every = Every(node.settings.healthcheck_interval, node.clock)
        # checks still running from an earlier round (hung): id(instance) -> instance; no
        # second thread is started for one, so a hanging healthcheck costs one thread
        self._busy: dict[int, Any] = {}
        self._busy_lock = threading.Lock()

    def tick(self) -> float:
        if self._every.due():
            self._every.ran()
            self.check_all()
        return self._every.wait()

    def check_all(self) -> None:
        """Check every running instance at once; each check bounded by the timeout."""
        node = self.node
        running = node.reconciler.running()
        if not running:
            return
        results: dict[int, Optional[BaseException]] = {}
        done = threading.Event()
        lock = threading.Lock()

        def check(index: int, instance: Any) -> None:
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
                self._busy.pop(id(instance), None)
            with lock:
                results[index] = error
                if len(results) == len(running):
                    done.set()

        for index, (_slot, instance) in enumerate(running):
            with self._busy_lock:
                if id(instance) in self._busy:
                    continue  # its last check has not returned: it counts as timed out
                self._busy[id(instance)] = instance
            threading.Thread(
                target=check,
                args=(index, instance),
                daemon=True,
                name=f"dim-healthcheck-{node.node_id}",
            ).start()
        timeout = node.settings.healthcheck_timeout
        done.wait(timeout)
        with lock:
            finished = dict(results)
        for index, (slot, instance) in enumerate(running):
            if index in finished:
                error = finished[index]
            else:
                error = TimeoutError(f"healthcheck did not return within {timeout:g} s")
            if error is None:
                self._mark_healthy(slot, instance)
            else:
                log.warning("instance of config %r is unhealthy: %r", slot.config.id, error)
                node.reconciler.unhealthy(slot, instance, error)

    def _mark_healthy(self, slot: Slot, instance: Any) -> None:
        if slot.instance is instance:
            slot.healthy = True
