"""The local instance table: claims, creates, disconnects.

Each config this node deals with has a :class:`~dim.slots.Slot`; its states and
transitions are listed in :mod:`dim.slots`, and every transition is made here, under
the reconciler's lock. Creates run on at most ``max_workers`` worker threads at once;
every disconnect (a move's, the fence's, a graceful stop's) starts at once on a thread
of its own, so it never waits on user code or queues behind busy workers.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Optional

from dim import share
from dim.claims import ClaimBook
from dim.events import Event, EventType
from dim.instances import InstanceCalls, UserCallbacks
from dim.lifecycle import Lifecycle
from dim.logs import NodeLog, fields
from dim.loop import Loop
from dim.protocol import ClaimRefused, ClaimStatus, ConfigPlace, ShareRead
from dim.renewal import held_until
from dim.slots import Slot, State
from dim.table import SlotTable

if TYPE_CHECKING:
    from dim.node import Node

log = logging.getLogger(__name__)

# how long a node whose heartbeat found a new share version waits for the write's hint
# (and the delta in it) before it reads the share itself
HINT_WAIT = 0.05


class Reconciler(Loop["Node"]):
    """Owns the local instance table and makes it match this node's desired set."""

    role = "reconciler"

    def __init__(self, node: Node, callbacks: UserCallbacks) -> None:
        super().__init__(node)
        self._log = NodeLog(log, node.node_id)
        self.calls = InstanceCalls(node.node_id, node.settings, node.emit, callbacks)
        self.table = SlotTable()
        self.claims = ClaimBook(node.node_id, node.store)
        self.claims_lock = self.claims.lock  # see dim.claims: taken before the table's lock
        self.lifecycle = Lifecycle(
            node, self.table, self.calls, self.claims, self.wake, lambda: node.leader.mark_dirty()
        )
        self._placements: dict[str, ConfigPlace] = {}
        self._hinted: set[str] = set()  # claims announced as released since the last try
        # added by a delta while another node held them: claimed once it releases them
        self._held: set[str] = set()
        self._retry_all_at = 0.0  # when to retry every pending claim, hint or not
        self._read_version: Optional[str] = None  # the version of the share last read
        # the latest assignment version this node knows of (from its heartbeat, a hint,
        # or its own read); written only here, under the table's lock
        self._version: Optional[str] = None
        self._have_read = False
        self._need_read = True
        self._full = True  # the next read takes the whole share, not a delta
        self._recheck_at = 0.0  # when to ask again where kept configs stand
        # when a hint or a read last moved the share this node holds on: a heartbeat
        # sent before then may report an older version than it knows
        self._known_at = float("-inf")
        # a heartbeat reported a share version no hint has brought yet: read at this
        # time unless the hint comes first (it is usually under way)
        self._check_at: Optional[float] = None
        # a read of the share is under way, and the latest version a hint announced
        # meanwhile that it could not apply (the read may already bring it)
        self._reading = False
        self._awaited: Optional[share.Hint] = None
        self._read_fence = 0  # the fence counter when the last read ran

    def __repr__(self) -> str:
        return f"<Reconciler node={self.node.node_id} {self.table.counts()}>"

    def is_stable(self) -> bool:
        """True when this node runs exactly its share of the latest assignment, and its
        claims have their lease (none waits for its settle)."""
        node = self.node
        with self.table.lock:
            if node.fenced or self._need_read or not self._have_read:
                return False
            if self.lifecycle.claims.settling:
                return False
            # (no share version: the leader has not placed this node yet)
            if self._read_version is None or self._read_version != self._version:
                return False
            return self.table.runs_exactly()

    def wait_until_stable(self, timeout: float) -> bool:
        deadline = self.node.clock() + timeout
        with self.table.changed:
            while not self.is_stable():
                remaining = deadline - self.node.clock()
                if remaining <= 0 or self.node.stop_event.is_set():
                    return False
                self.table.changed.wait(min(remaining, self.node.settings.heartbeat_interval))
            return True

    @property
    def version(self) -> Optional[str]:
        """The latest assignment version this node knows of."""
        return self._version

    # -- signals from other loops -----------------------------------------------------

    def saw_version(self, version: Optional[str], sent: float) -> None:
        """A heartbeat sent at ``sent`` found this share version: read the share again
        if no hint brings it first (protocol.rst §4.1)."""
        with self.table.lock:
            if version == self._version or sent < self._known_at:
                # known; or the heartbeat left before a hint or read moved us on, and may
                # report the version before it: the next heartbeat tells
                return
            self._version = version
            if version == self._read_version:
                self._check_at = None
                return
            if self._check_at is not None:
                return  # already waiting (a later version must not put the read off)
            # the write's hint to this node left Redis before this reply: give it a
            # moment to arrive (a lost hint costs that moment more than a heartbeat)
            self._check_at = self.node.clock() + HINT_WAIT
        super().wake()

    def wake(self, read: bool = False) -> None:
        if read:
            self._need_read = True
        super().wake()

    def released(self, ckeys: tuple[str, ...]) -> None:
        """Another node released claims: retry ours now if we wait for one of them."""
        with self.table.lock:
            # (announced before the tick that makes their slots: claimed there at once)
            self._held = self._held.difference(ckeys) if ckeys else set()
            waiting = {c for c, s in self.table.slots.items() if s.state is State.CLAIMING}
            if not waiting or (ckeys and waiting.isdisjoint(ckeys)):
                return
            if ckeys:
                self._hinted.update(ckeys)
            else:
                self._retry_all_at = 0.0  # some claim was freed: retry them all
        self.wake()

    def assigned(
        self,
        version: Optional[int],
        previous: Optional[int],
        targets: tuple[str, ...],
        delta: Optional[share.Delta] = None,
        held: tuple[str, ...] = (),
    ) -> None:
        """The leader wrote version ``version`` after ``previous``; ``targets`` are the
        nodes whose share it changed (empty: not said; a hint in this node's inbox).

        With ``delta`` (the configs added or changed, and where each removed config
        went), a node that holds share version ``previous`` applies it without a read
        (protocol.rst §4.1), and claims what it adds that another node held (``held``)
        once its release is announced. A node not named skips the read if it had read
        ``previous`` and handles nothing outside its share: its share is the same."""
        node = self.node
        if version is not None:
            with self.table.lock:
                if self._read_version == str(version) and not self._need_read:
                    return  # read already (share versions are never reused)
        if delta is not None and version is not None and previous is not None:
            with self.table.lock:
                applies = self._have_read and self._follows(previous, str(version))
                if applies:
                    self._apply_delta(str(version), delta, held)
            if applies:
                self.table.notify()
                super().wake()
                return
        if version is None or previous is None or not targets or node.node_id in targets:
            hint = share.Hint(str(version), previous, delta, held)
            if version is None or not self._await(hint):
                self.wake(read=True)
            return
        with self.table.lock:
            same = (
                not self._need_read
                and self._read_version is not None
                and self._read_version == str(previous)
                and self._version in (None, self._read_version, str(version))
                and self.table.slots.keys() == self.table.desired.keys()
            )
            if same:
                self._read_version = str(version)
                self._version = str(version)
                self._known_at = node.clock()
        if same:
            self.table.notify()
        else:
            self.wake(read=True)

    def has_read(self) -> bool:
        """A read of the share has been sent (it may have missed a hint)."""
        with self.table.lock:
            return self._have_read or self._reading

    def _await(self, hint: share.Hint) -> bool:
        """Keep a hint that comes while a read is under way, which may already bring it (a
        joining node's first read, sent before or after the write): once the read is in,
        tick applies it or reads again (:meth:`_after_read`). False: no read under way."""
        with self.table.lock:
            if self._reading and (
                self._awaited is None or share.newer(hint.version, self._awaited.version)
            ):
                self._awaited = hint
            return self._reading

    def _follows(self, previous: int, version: str) -> bool:
        """Under the table's lock: the delta of write ``version`` from share version
        ``previous`` applies to the share this node holds."""
        empty = not self.table.desired and not self.table.slots
        return not (self._need_read or self._full) and share.follows(
            previous, version, self._read_version, self._read_fence, empty
        )

    def _after_read(self, hint: share.Hint) -> None:
        """Under the table's lock, after a read: a hint that came while it was under way
        and found no share to apply to. A read that came back older than the hint's
        version takes its delta, or is read again now."""
        if not share.newer(hint.version, str(self._read_fence)):
            return  # written before the read ran: the read brought it, or what followed
        delta, previous = hint.delta, hint.previous
        if delta is not None and previous is not None and self._follows(previous, hint.version):
            self._apply_delta(hint.version, delta, hint.held)
            return
        self._need_read = True
        super().wake()

    def _apply_delta(self, version: str, delta: share.Delta, held: tuple[str, ...]) -> None:
        """Under the table's lock: the share after a delta the leader sent inline."""
        table = self.table
        table.desired, self._placements = share.after_delta(
            table.desired, self._placements, table.slots, delta
        )
        self._held.difference_update([*delta[0], *delta[1]])  # the latest word counts
        self._held.update(c for c in held if c in delta[0] and c not in table.slots)
        self._read_version = version
        self._known_at = self.node.clock()
        if self._version is None or share.newer(version, self._version):
            self._version = version

    def renewed(
        self, sent: dict[str, tuple[int, float]], statuses: dict[str, ClaimStatus], at: float
    ) -> None:
        """A heartbeat sent at ``at`` renewed these claims: each lives on in Redis."""
        with self.table.lock:
            for ckey, status in statuses.items():
                if status not in (ClaimStatus.RENEWED, ClaimStatus.TAKEN_BACK):
                    continue
                token, ttl = sent[ckey]
                slot = self.table.slots.get(ckey)
                if slot is not None and slot.token == token:
                    slot.lease_until = held_until(slot.lease_until, at, ttl)
            self.table.changed.notify_all()

    def lease_lost(self, ckey: str, token: int, status: int) -> None:
        """The heartbeat found this claim held by another node (or released): stop now."""
        with self.table.lock:
            slot = self.table.slots.get(ckey)
            if slot is None or slot.token != token or slot.state is State.CLAIMING or slot.lost:
                return
            self.lifecycle.begin_stop(slot, lost=True)
        # the stop runs already: a log handler that blocks cannot hold it up
        self._log.warning(
            "node %s lost its claim of %r (%s); stopping it",
            self.node.node_id,
            slot.config.id,
            "gone" if status == ClaimStatus.RELEASED else "held by another node",
            extra=fields(config=slot.config.id, token=token),
        )
        self.node.emit(Event(EventType.LEASE_LOST, self.node.node_id, slot.config.id, token))
        self.wake(read=True)

    def unhealthy(self, slot: Slot, instance: Any, error: Optional[BaseException]) -> None:
        """The health loop found this instance unhealthy: disconnect and recreate it."""
        with self.table.lock:
            if self.table.slots.get(slot.ckey) is not slot or slot.instance is not instance:
                return
            if slot.state is not State.RUNNING or self.table.closing:
                return
            slot.healthy = False
            token = slot.token
            self.lifecycle.begin_stop(slot, recreate=slot.config)
        self.node.emit(
            Event(
                EventType.INSTANCE_UNHEALTHY,
                self.node.node_id,
                slot.config.id,
                token,
                error=error,
            )
        )

    def fence(self) -> None:
        """Renewals failed too long: start every disconnect now, without touching Redis
        and without waiting for any of them (nor for a log handler: the disconnects start
        before anything is logged)."""
        node = self.node
        with self.table.lock:
            if node.fenced:
                return
            node.fenced = True
            victims = []
            for ckey, slot in list(self.table.slots.items()):
                slot.cancel.set()
                slot.recreate = None
                if slot.state is State.CLAIMING:
                    del self.table.slots[ckey]
                elif slot.take_stop():
                    victims.append(slot)
            self._need_read = True
            self._full = True
        for slot in victims:
            self.lifecycle.spawn_stop(slot)
        self._log.warning(
            "node %s could not renew its claims for %.2fs: stopping %d instances",
            node.node_id,
            node.settings.renew_deadline,
            len(victims),
        )
        node.set_leader(None)
        node.emit(Event(EventType.FENCED, node.node_id, data={"stopped": len(victims)}))
        self.table.notify()

    def unfence(self) -> None:
        with self.table.lock:
            self.node.fenced = False
        self._log.warning("node %s renewed again; resuming", self.node.node_id)
        self.wake(read=True)

    # -- the loop -----------------------------------------------------------------------

    def tick(self) -> float:
        node = self.node
        interval = node.settings.heartbeat_interval
        if self.lifecycle.pending:
            self.lifecycle.retry()
        if node.fenced or self.table.closing:
            return interval
        now = node.clock()
        if now >= self._recheck_at:
            self._recheck_at = now + interval
            with self.table.lock:
                # a config kept outside our share (share.keep, now or at a plan) may be
                # given elsewhere by a write that leaves our share alone: no hint says
                # so: ask where it stands once a heartbeat (one a delta moved stops now)
                desired = self.table.desired
                if any(
                    c not in desired
                    and s.state in (State.RUNNING, State.CREATING)
                    and (s.kept or self._keep(c))
                    for c, s in self.table.slots.items()
                ):
                    self._need_read = True
        wait = interval
        with self.table.lock:
            if self._check_at is not None:
                if self._read_version == self._version:
                    self._check_at = None  # the hint came
                elif now >= self._check_at:
                    self._check_at = None
                    self._need_read = True
                else:
                    wait = self._check_at - now
        read = False  # (set where it reads: a read asked for meanwhile retries every claim)
        overtaken = False
        if self._need_read and not self._have_read and node.listener is not None:
            # the first read after the subscription: a write after it is heard as a
            # hint (a join costs one read); not for long if subscribing fails
            node.subscribed.wait(min(1.0, interval))
        if self._need_read:
            self._need_read, read = False, True
            with self.table.lock:
                full, self._full = self._full, False
                before = self._read_version
                held = None if full or not self._have_read else self._read_version
                # a delta names what left the share itself: ask only about the rest
                handled = [
                    c for c in self.table.slots if held is None or c not in self.table.desired
                ]
                self._reading = True
            try:
                got = node.store.read_desired(node.node_id, handled, held)
                if held is not None and got.removed is None:
                    # no delta from our version: the whole share came back, and we must
                    # also learn where each config we handle outside it stands
                    with self.table.lock:
                        handled = list(self.table.slots)
                    got = node.store.read_desired(node.node_id, handled, None)
            except BaseException:
                with self.table.lock:
                    self._reading = False
                    self._awaited = None  # read again anyway
                self._need_read = True
                self._full = self._full or full
                raise
            with self.table.lock:
                self._reading = False
                awaited, self._awaited = self._awaited, None
                self._read_fence = got.fence
                overtaken = self._read_version != before
                if overtaken:
                    # a delta from a hint moved the share on while this read was under
                    # way: the read may predate it; keep the hint's and read again
                    self._need_read = self._need_read or self._read_version != got.version
                    got = ShareRead(self._read_version, {}, {}, ())
                self.table.desired, self._placements = share.after_read(
                    self.table.desired, self._placements, self.table.slots, got
                )
                version = got.version
                self._read_version = version
                self._known_at = node.clock()
                self._have_read = True
                if not overtaken:
                    if (
                        self._version is None
                        or version is None
                        or not share.newer(self._version, version)
                    ):
                        self._version = version
                    elif self._check_at is None:
                        # a heartbeat found a later version while this read was under
                        # way: the read may predate that write; its hint or a read
                        self._check_at = node.clock() + HINT_WAIT
                if awaited is not None:
                    self._after_read(awaited)
            self.claims.release_orphans()
        # (an overtaken read did not say where the configs outside the share stand)
        to_claim = self._plan(retry_all=read, informed=read and not overtaken)
        if to_claim:
            s = node.settings
            with self.claims_lock:
                # a claim we are about to release must go first, or the claim script
                # would find it still held
                self.claims.flush()
                sent = node.clock()
                tokens = node.store.claim(node.node_id, to_claim, s.create_lease, node.session)
                self._claimed(tokens, sent)
        self.table.notify()
        with self.table.lock:
            if self._check_at is not None:  # (set by the read above, perhaps)
                wait = min(wait, max(0.0, self._check_at - node.clock()))
        return wait

    def _plan(self, retry_all: bool, informed: bool = False) -> list[str]:
        """Start/stop what the desired set says; return the config keys to claim.

        Pending claims are all retried after a read and once per heartbeat interval;
        in between, a ``released`` hint retries only the claims it names, so a node
        waiting for many claims does not ask for all of them on every release.
        ``informed``: this tick read where the configs outside the share stand; a
        config kept outside it is stopped only then (otherwise a read is asked for).
        """
        now = self.node.clock()
        changed = []  # logged once the lock is let go (the watchdog takes it too)
        with self.table.lock:
            if self.table.closing or self.node.fenced:
                return []
            ask = False
            for ckey, slot in list(self.table.slots.items()):
                want = self.table.desired.get(ckey)
                if want is not None:
                    slot.kept = False  # back in the share
                elif slot.state is not State.CLAIMING and self._keep(ckey):
                    slot.kept = True  # read for before it is stopped (see tick)
                    continue
                elif slot.kept and not informed and slot.state in (State.RUNNING, State.CREATING):
                    # kept on what the node knew then (a reset window may have ended
                    # since): stopped only on a read of where it stands now
                    ask = True
                    continue
                if want is None:
                    if slot.state is State.CLAIMING:
                        del self.table.slots[ckey]
                    else:
                        self.lifecycle.begin_stop(slot)
                elif slot.state is State.RUNNING and want.json != slot.config.json:
                    changed.append((want.id, slot.token))
                    self.lifecycle.begin_stop(slot, recreate=want)
                elif slot.state is State.CLAIMING and want.json != slot.config.json:
                    slot.config = want
            fresh = set()  # new slots are claimed at once, whatever woke us
            for ckey, config in self.table.desired.items():
                if ckey not in self.table.slots:
                    self.table.slots[ckey] = Slot(config)
                    fresh.add(ckey)
            fresh -= self._held  # ... but those held elsewhere once their release is heard
            self._held = set()
            hinted, self._hinted = self._hinted, set()
            everything = retry_all or now >= self._retry_all_at
            if everything:
                self._retry_all_at = now + self.node.settings.heartbeat_interval
            to_claim = [
                c
                for c, s in self.table.slots.items()
                if s.state is State.CLAIMING
                and s.retry_at <= now
                and (everything or c in hinted or c in fresh)
            ]
        if ask:
            self.wake(read=True)
        for config_id, token in changed:
            extra = fields(config=config_id, token=token)
            self._log.info("config %r changed; recreating its instance", config_id, extra=extra)
        return to_claim

    def _keep(self, ckey: str) -> bool:
        """Keep running a config that is not in our desired set? (:func:`dim.share.keep`)"""
        era = self.node.store.era
        return share.keep(self._read_version, self._placements.get(ckey), era.resetting)

    def _claimed(self, tokens: dict[str, int], sent: float) -> None:
        node = self.node
        s = node.settings
        lost: list[tuple[str, int]] = []
        start: list[tuple[Slot, int]] = []
        with self.table.lock:
            for ckey, token in tokens.items():
                slot = self.table.slots.get(ckey)
                if (
                    token == ClaimRefused.NOT_NOW
                    and slot is not None
                    and slot.state is State.CLAIMING
                ):
                    # a reset window: try again when it ends
                    slot.retry_at = max(node.clock(), node.store.era.reset_until)
                    continue
                if token <= 0:
                    continue
                if (
                    slot is None
                    or slot.state is not State.CLAIMING
                    or self.table.closing
                    or node.fenced
                    or ckey not in self.table.desired
                ):
                    lost.append((ckey, token))  # taken but no longer wanted: give back
                    continue
                slot.claimed(token, sent + s.create_lease)
                start.append((slot, token))
        for slot, token in start:
            self.lifecycle.start_create(slot, token)
        if lost:
            self.claims.release(dict(lost))

    # -- shutdown -------------------------------------------------------------------------

    def begin_close(self) -> None:
        """Take no new claims and start nothing new (the first step of a graceful stop)."""
        with self.table.lock:
            self.table.closing = True

    def close(self, timeout: float) -> None:
        """Graceful stop: start every disconnect at once, release each claim as soon as
        its instance is down, and wait for them at most ``timeout``."""
        node = self.node
        with self.table.lock:
            self.table.closing = True
            victims = []
            for ckey, slot in list(self.table.slots.items()):
                slot.cancel.set()
                slot.recreate = None
                if slot.state is State.CLAIMING:
                    del self.table.slots[ckey]
                elif slot.stop_free():
                    victims.append(slot)
        for slot in victims:
            # each taken on its thread: stopped here, between two slots, by a signal
            # handler, we leave none taken and not started (a second pass starts the rest)
            self.lifecycle.spawn_stop(slot, take=True)
        self.lifecycle.wait_stopped(node.clock() + timeout)
        self.lifecycle.close()
        self.claims.flush()  # the overruns' claims (their release thread may not have run)
        self.claims.release_orphans()
        with self.table.lock:
            left = list(self.table.slots.values())
        if left:
            self._log.warning(
                "node %s stopped with %d instances still busy: %s",
                node.node_id,
                len(left),
                [s.config.id for s in left],
            )
