"""The local instance table: one slot per config this node deals with.

:class:`SlotTable` owns the slots, this node's desired set (as last read) and the lock
that guards both. The reconciler (:mod:`dim.reconciler`) is its one writer, always
under :attr:`SlotTable.lock`; any thread reads it through the views below. Slot states
and transitions are in :mod:`dim.slots`.
"""

from __future__ import annotations

import threading
from typing import Any

from dim.configs import Config
from dim.settings import Settings
from dim.slots import Lease, Slot, State


class SlotTable:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)  # notified when a slot changes
        self.slots: dict[str, Slot] = {}
        self.desired: dict[str, Config] = {}
        self.closing = False  # a graceful stop began: nothing new starts (reconciler)

    def notify(self) -> None:
        """Wake whoever waits for a slot to change."""
        with self.changed:
            self.changed.notify_all()

    def counts(self) -> dict[str, int]:
        """State name -> how many slots are in it."""
        with self.lock:
            counts: dict[str, int] = {}
            for slot in self.slots.values():
                counts[slot.state.value] = counts.get(slot.state.value, 0) + 1
            return counts

    def held_claims(self, settings: Settings) -> dict[str, tuple[int, float]]:
        """Claims this node holds now, for the heartbeat: ckey -> (token, TTL to renew
        with: ``create_lease`` while being created, else ``lease``)."""
        s = settings
        with self.lock:
            return {
                c: (slot.token, s.create_lease if slot.state is State.CREATING else s.lease)
                for c, slot in self.slots.items()
                if slot.token is not None and slot.state is not State.CLAIMING and not slot.lost
            }

    def health(self) -> tuple[int, int]:
        """(instances running here, configs being recreated after a failed health check)."""
        with self.lock:
            running = sum(1 for s in self.slots.values() if s.state is State.RUNNING)
            return running, sum(1 for s in self.slots.values() if s.healthy is False)

    def instances(self) -> dict[Any, Any]:
        with self.lock:
            return {
                s.config.id: s.instance for s in self.slots.values() if s.state is State.RUNNING
            }

    def running(self) -> list[tuple[Slot, Any]]:
        with self.lock:
            return [(s, s.instance) for s in self.slots.values() if s.state is State.RUNNING]

    def leases(self, node_id: str) -> dict[Any, Lease]:
        with self.lock:
            return {
                s.config.id: Lease(s.config.id, s.token, node_id)
                for s in self.slots.values()
                if s.token is not None and s.state is not State.CLAIMING and not s.lost
            }

    def local_view(self) -> dict[Any, dict[str, Any]]:
        with self.lock:
            return {
                s.config.id: {"state": s.state.value, "token": s.token, "healthy": s.healthy}
                for s in self.slots.values()
            }

    def runs_exactly(self) -> bool:
        """Every desired config runs here with its current config, and nothing else."""
        with self.lock:
            if set(self.slots) != set(self.desired):
                return False
            return all(
                s.state is State.RUNNING and s.config.json == self.desired[c].json
                for c, s in self.slots.items()
            )
