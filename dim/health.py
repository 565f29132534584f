"""The health loop: runs ``healthcheck`` on every local instance with a timeout (§4.7).

A check that raises, returns ``False`` or does not return within
``healthcheck_timeout`` marks the instance unhealthy: the reconciler disconnects it and
creates it again under the same claim (with the usual retries and hand-off).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Callable, Optional

import schedule

from dim.errors import DimError
from dim.loop import Loop
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
        self._scheduler = schedule.Scheduler()
        # schedule accepts float intervals although its hints say int
        every = self._scheduler.every(node.settings.healthcheck_interval)  # type: ignore[arg-type]
        every.seconds.do(self.check_all)

    def tick(self) -> float:
        self._scheduler.run_pending()
        idle = self._scheduler.idle_seconds
        return max(0.0, idle if idle is not None else self.node.settings.healthcheck_interval)

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
            with lock:
                results[index] = error
                if len(results) == len(running):
                    done.set()

        for index, (_slot, instance) in enumerate(running):
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
