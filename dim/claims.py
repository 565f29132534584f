"""The claims this node lets go: releases (group-committed) and a fence's orphans.

:class:`ClaimBook` owns :attr:`ClaimBook.lock` (the *claims lock*), held around every
Redis call that takes, renews or releases claims (claim, heartbeat, release, retoken,
settle),
so a renewal never races a release. Lock order: the claims lock first, then the slot
table's lock (:mod:`dim.table`), then this book's own mutex, never the other way.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import redis

from dim.logs import NodeLog
from dim.store import Store

log = logging.getLogger("dim.reconciler")


class ClaimBook:
    def __init__(self, node_id: str, store: Store) -> None:
        self._node_id = node_id
        self._log = NodeLog(log, node_id)
        self._store = store
        self.lock = threading.RLock()
        self._mutex = threading.Lock()
        self._orphans: dict[str, int] = {}  # claims dropped by a fence, maybe still in Redis
        self._releasing: dict[str, int] = {}  # disconnected, claim not yet released
        self._settling: dict[str, int] = {}  # created, claim still on its create lease

    def queue(self, ckey: str, token: int, fenced: bool) -> bool:
        """A slot is gone: queue its claim for release (True: the caller flushes), or,
        when fenced, keep it as an orphan, released once Redis answers (False)."""
        with self._mutex:
            if fenced:
                self._orphans[ckey] = token
                return False
            self._releasing[ckey] = token
            return True

    @property
    def queued(self) -> bool:
        """Some claim waits for its release."""
        return bool(self._releasing)

    def flush(self) -> None:
        """Release every queued claim in one round trip with one hint.

        Group commit: while one worker's release is in flight (holding the claims lock),
        the workers finishing meanwhile queue theirs, and the next one through releases
        the whole queue."""
        with self.lock:
            with self._mutex:
                batch, self._releasing = self._releasing, {}
            if batch:
                self.release(batch)

    def settle_later(self, ckey: str, token: int) -> None:
        """A create returned: its claim may live a lease from now, where it has a create
        lease until the next heartbeat; :meth:`settle` (the reconciler's tick, which
        each worker task wakes) sends it."""
        with self._mutex:
            self._settling[ckey] = token

    @property
    def settling(self) -> bool:
        """Some claim waits for :meth:`settle`, or its call is under way."""
        return bool(self._settling)

    def settle(self, ttl: float, running: Callable[[dict[str, int]], dict[str, int]]) -> None:
        """Give each claim queued by :meth:`settle_later` whose instance still runs
        (``running`` picks them, under the claims lock) ``ttl`` (a lease) from now, in
        one round trip (protocol.rst §6). A failure is not retried: the claim keeps its
        create lease until the next heartbeat renews it for a lease, which only makes a
        takeover after a crash slower. The queue empties once the call is over, so that
        a node is not :meth:`~dim.reconciler.Reconciler.is_stable` while one is due."""
        with self.lock:
            with self._mutex:
                batch = dict(self._settling)
            try:
                picked = running(batch) if batch else batch
                if picked:
                    self._store.settle(self._node_id, picked, ttl)
            except Exception as exc:  # (a reply it cannot read too: the tick goes on)
                self._log.debug(
                    "node %s could not settle %d claims: %r", self._node_id, len(batch), exc
                )
            finally:
                with self._mutex:
                    for ckey, token in batch.items():
                        if self._settling.get(ckey) == token:
                            del self._settling[ckey]

    def release_orphans(self) -> None:
        """Let go of the claims a fence dropped (those still wanted are claimed anew)."""
        with self.lock:
            with self._mutex:
                orphans, self._orphans = self._orphans, {}
            if orphans:
                self.release(orphans)

    def release(self, tokens: dict[str, int]) -> None:
        """Delete claims still held with exactly these tokens; callers hold the claims
        lock and have already dropped the slots.

        A release that fails is queued again (:attr:`queued`: the reconciler's tick
        sends it), so a connection blip does not leave the config waiting out its lease.
        Sending it late is safe: a claim taken since has another token and stays. So
        is one that a signal handler interrupted (stop() on the main thread: its next
        pass sends it)."""
        node_id = self._node_id
        try:
            self._store.release(node_id, tokens)
        except BaseException as exc:
            with self._mutex:
                for ckey, token in tokens.items():
                    if self._releasing.get(ckey, 0) < token:
                        self._releasing[ckey] = token
            if not isinstance(exc, redis.RedisError):
                raise
            self._log.warning(
                "node %s could not release %d claims (queued to be sent again; "
                "unrenewed, they lapse by themselves): %r",
                node_id,
                len(tokens),
                exc,
            )
