"""What the leader tells the logs and the event listeners after a rebalance."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from dim import plan
from dim.configs import Config
from dim.events import Event, EventType
from dim.logs import NodeLog

if TYPE_CHECKING:
    from dim.node import Node


def unplaced(
    node: Node, log: NodeLog, now: Mapping[str, str], configs: Mapping[str, Config]
) -> None:
    """The configs without a place changed (``now``: config -> why): warn, or say that
    every config has a place again, and emit ``CONFIGS_UNPLACED``."""
    if now:
        log.warning("%d configs cannot be placed: %s", len(now), plan.summary(now))
    else:
        log.info("every config has a place again")
    node.emit(
        Event(
            EventType.CONFIGS_UNPLACED,
            node.node_id,
            data={"unplaced": {configs[c].id: r for c, r in now.items()}},
        )
    )


def applied(
    node: Node, log: NodeLog, version: int, step: plan.Plan, nodes: int, configs: int, grace: float
) -> None:
    """A rebalance was written as ``version``: log it and emit ``REBALANCE_APPLIED``.
    ``nodes``: the live nodes; ``configs``: the configs wanted; ``grace``: a reset
    window is open."""
    change = step.change
    log.info(
        "rebalance v%d: %d configs on %d nodes (%d moved, %d placed, %d removed, "
        "%d nodes dropped)%s",
        version,
        len(step.assignment),
        nodes,
        step.moved,
        step.placed,
        len(change.unassign),
        len(change.drop_nodes),
        " [waiting for claims after a Redis reset]" if grace else "",
    )
    node.emit(
        Event(
            EventType.REBALANCE_APPLIED,
            node.node_id,
            data={
                "version": version,
                "moved": step.moved,
                "placed": step.placed,
                "removed": len(change.unassign),
                "nodes": nodes,
                "configs": len(step.assignment),
                "unplaced": configs - len(step.assignment),
            },
        )
    )
