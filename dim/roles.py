"""The narrow interfaces the loops know each other by (docs/architecture.rst).

A loop never imports another loop's module: the heartbeat talks to "the reconciler" and
"the leader" through these protocols, which :class:`dim.node.Node` holds. The concrete
classes (:class:`dim.reconciler.Reconciler`, :class:`dim.leader.LeaderLoop`) satisfy
them; :class:`dim.manager.Manager` wires them together. So the modules import one
another in one direction only.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, Optional, Protocol

from dim.events import Event
from dim.protocol import ClaimStatus, View
from dim.settings import Settings
from dim.slots import Slot
from dim.table import SlotTable


class Host(Protocol):
    """What every loop needs of its node."""

    node_id: str
    settings: Settings
    stop_event: threading.Event

    def emit(self, event: Event) -> None: ...


class Runnable(Protocol):
    """A loop's thread, as the node and the manager start, wake and join it."""

    def start(self) -> None: ...

    def wake(self) -> None: ...

    def join(self, timeout: float) -> None: ...


class ReconcilerRole(Runnable, Protocol):
    """The reconciler, as the heartbeat, the fence, the listener and the health loop see
    it."""

    table: SlotTable
    claims_lock: threading.RLock

    @property
    def version(self) -> Optional[str]: ...

    def wake(self, read: bool = False) -> None: ...  # read: this node's share again

    def has_read(self) -> bool: ...

    def saw_version(self, version: Optional[str], sent: float) -> None: ...

    def renewed(
        self, sent: dict[str, tuple[int, float]], statuses: dict[str, ClaimStatus], at: float
    ) -> None: ...

    def lease_lost(self, ckey: str, token: int, status: int) -> None: ...

    def fence(self) -> None: ...

    def unfence(self) -> None: ...

    def released(self, ckeys: tuple[str, ...]) -> None: ...

    def assigned(
        self,
        version: Optional[int],
        previous: Optional[int],
        targets: tuple[str, ...],
        delta: Optional[tuple[Mapping[str, str], Mapping[str, Optional[str]]]] = None,
        held: tuple[str, ...] = (),
    ) -> None: ...

    def unhealthy(self, slot: Slot, instance: Any, error: Optional[BaseException]) -> None: ...


class LeaderRole(Runnable, Protocol):
    """The leader loop, as the heartbeat, the listener and the reconciler see it."""

    alive_at: float

    def wake(self) -> None: ...

    def cpu_time(self) -> Optional[float]: ...

    def observe(self, view: View, sent_at: float) -> None: ...

    def mark_dirty(self) -> None: ...

    def request_refresh(self) -> None: ...
