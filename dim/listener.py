"""The listener loop: pub/sub hints that wake the other loops sooner (protocol.rst §11).

A hint is never trusted for content: it only makes a loop look at the keys now rather
than at its next tick. Malformed, oversized or unknown messages are logged and dropped.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Optional

import redis

from dim.errors import MessageError
from dim.logs import NodeLog
from dim.loop import Loop
from dim.messages import Kind, Message, decode

if TYPE_CHECKING:
    from redis.client import PubSub

    from dim.node import Node

log = logging.getLogger(__name__)

#: Seconds a read may block: an idle listener wakes twice a second, not ten times.
#: Under stop()'s one second for its threads to end, so that even a Redis that cannot
#: carry the node's own ``left`` hint (which ends the read under way) lets the listener
#: end in time.
POLL = 0.5


class HintListener(Loop["Node"]):
    role = "listener"

    def __init__(self, node: Node) -> None:
        super().__init__(node)
        self._log = NodeLog(log, node.node_id)
        self._pubsub: Optional[PubSub] = None
        self.dropped = 0

    def _open(self) -> PubSub:
        node = self.node
        pubsub = node.store.client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call,unused-ignore]
        try:
            # every node's channel, and this node's inbox (protocol.rst §11)
            pubsub.subscribe(node.store.keys.events, node.store.keys.inbox(node.node_id))
        except BaseException:
            pubsub.close()
            raise
        return pubsub

    def tick(self) -> float:
        node = self.node
        if node.leaving:
            # no hint matters to a node that leaves (it claims nothing and may not lead):
            # read no more, so that stop() waits for no read; and a first read still
            # waiting for our subscription waits no longer (none will come)
            self.close()
            node.subscribed.set()
            return node.settings.heartbeat_interval
        if self._pubsub is None:
            self._pubsub = self._open()
            # hints may have been missed while we were not subscribed: the leader looks
            # at the membership again; the reconciler reads only if a read went out
            # before (its first read waits for this subscription)
            if node.subscribed.is_set() or node.reconciler.has_read():
                node.reconciler.wake(read=True)
            node.leader.wake()
            node.subscribed.set()
        try:
            # the node's own ``left`` hint ends the read under way when it leaves
            while not node.stop_event.is_set() and not node.leaving:
                raw = self._pubsub.get_message(timeout=POLL)
                if raw is not None:
                    self.handle(raw.get("data"))
        except (redis.RedisError, OSError, ValueError):
            self.close()
            raise
        return 0.0

    def close(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception:  # closing a broken connection may raise; nothing to keep
                self._log.debug("closing pub/sub connection failed", exc_info=True)

    def handle(self, data: Any) -> Optional[Message]:
        """Act on one raw payload; returns the decoded message, or None if dropped."""
        node = self.node
        try:
            message = decode(data)
        except MessageError as exc:
            self.dropped += 1
            self._log.warning("dropping pub/sub message on %s: %s", node.store.keys.events, exc)
            return None
        if message.node == node.node_id:
            return message
        kind = message.kind
        if kind in (Kind.JOINED, Kind.LEFT) and node.is_leader:
            node.leader.wake()
        if kind is Kind.FAILED:
            node.leader.mark_dirty()
        if kind is Kind.REFRESH and node.is_leader:
            node.leader.request_refresh()
        if kind is Kind.CONTROL and node.is_leader:
            node.leader.request_refresh()
            node.leader.mark_dirty()
        if kind is Kind.RELEASED:
            node.reconciler.released(message.ckeys)
        if kind is Kind.FAILED:
            node.reconciler.released(())
        if kind is Kind.ASSIGNED:
            stale = message.epoch is not None and message.epoch < node.epoch and node.is_leader
            if not stale:
                # (a version the heartbeat already reported still needs its delta)
                delta = None
                if message.added is not None and message.moved is not None:
                    delta = (message.added, message.moved)
                node.reconciler.assigned(
                    message.version, message.previous, message.targets, delta, message.ckeys
                )
        if kind is Kind.LEADER_LEFT:
            node.heartbeat.wake()
        return message
