"""The local instance table: claims, creates, disconnects.

Each config this node deals with has a :class:`~dim.slots.Slot`; its states and
transitions are listed in :mod:`dim.slots`, and every transition is made here, under
the reconciler's lock. Normal moves queue their ``create``/``disconnect`` on a pool of
``max_workers``; the fence and a graceful stop start every disconnect at once on a
thread of its own, so they never wait on user code or queue behind busy workers.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from typing import TYPE_CHECKING, Any, Callable, Optional

import redis

from dim.configs import Config, decode
from dim.errors import CallTimeout
from dim.events import Event, EventType
from dim.instances import Cancelled, InstanceCalls, UserCallbacks
from dim.loop import Loop
from dim.messages import Message
from dim.protocol import ClaimRefused, ClaimStatus, ConfigPlace
from dim.slots import Slot, State
from dim.table import SlotTable
from dim.usercode import Runners, block_signals

if TYPE_CHECKING:
    from dim.node import Node

log = logging.getLogger(__name__)


class Reconciler(Loop):
    """Owns the local instance table and makes it match this node's desired set."""

    role = "reconciler"

    def __init__(self, node: Node, callbacks: UserCallbacks) -> None:
        super().__init__(node)
        self.calls = InstanceCalls(node.node_id, node.settings, node.emit, callbacks)
        self.table = SlotTable()
        # Held around every Redis call that takes, renews or releases claims (claim,
        # heartbeat, release, retoken), so a renewal never races a release; always taken
        # before the table's lock, never after.
        self.claims_lock = threading.RLock()
        self._placements: dict[str, ConfigPlace] = {}
        self._orphans: dict[str, int] = {}  # claims dropped by a fence, maybe still in Redis
        self._releasing: dict[str, int] = {}  # disconnected, claim not yet released
        self._hinted: set[str] = set()  # claims announced as released since the last try
        self._retry_all_at = 0.0  # when to retry every pending claim, hint or not
        self._read_version: Optional[str] = None
        self._have_read = False
        self._need_read = True
        self._closing = False
        # stops whose thread could not be started (the process is at its thread limit):
        # every tick tries them again, fenced or not
        self._unstarted: list[Slot] = []
        self._unstarted_error: Optional[BaseException] = None
        # creates whose worker thread could not be started: (slot, token), retried too
        self._unstarted_creates: list[tuple[Slot, int]] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=node.settings.max_workers,
            thread_name_prefix=f"dim-worker-{node.node_id}",
            initializer=block_signals,
        )
        # the threads that stop instances: never bounded, so no stop waits for a worker
        self._tasks = Runners(f"dim-stop-{node.node_id}", keep=node.settings.max_workers)

    def __repr__(self) -> str:
        return f"<Reconciler node={self.node.node_id} {self.table.counts()}>"

    def is_stable(self) -> bool:
        """True when this node runs exactly its share of the latest assignment."""
        node = self.node
        with self.table.lock:
            if node.fenced or self._need_read or not self._have_read:
                return False
            if self._read_version is None or self._read_version != node.version:
                return False
            if self._read_version == node.joined_version:
                return False  # the leader has not placed anything since we joined
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

    # -- signals from other loops -----------------------------------------------------

    def wake(self, read: bool = False) -> None:
        if read:
            self._need_read = True
        super().wake()

    def released(self, ckeys: tuple[str, ...]) -> None:
        """Another node released claims: retry ours now if we wait for one of them."""
        with self.table.lock:
            waiting = {c for c, s in self.table.slots.items() if s.state is State.CLAIMING}
            if not waiting or (ckeys and waiting.isdisjoint(ckeys)):
                return
            if ckeys:
                self._hinted.update(ckeys)
            else:
                self._retry_all_at = 0.0  # some claim was freed: retry them all
        self.wake()

    def assigned(
        self, version: Optional[int], previous: Optional[int], targets: tuple[str, ...]
    ) -> None:
        """The leader wrote version ``version`` after ``previous``; ``targets`` are the
        nodes whose share it changed (empty: not said).

        A node not named skips the read if it had read ``previous`` and handles nothing
        outside its share: its share is the same.
        """
        node = self.node
        if version is None or previous is None or not targets or node.node_id in targets:
            self.wake(read=True)
            return
        with self.table.lock:
            same = (
                not self._need_read
                and self._read_version is not None
                and self._read_version == str(previous)
                and node.version in (None, self._read_version, str(version))
                and self.table.slots.keys() == self.table.desired.keys()
            )
            if same:
                self._read_version = str(version)
                node.version = str(version)
        if same:
            self._notify()
        else:
            self.wake(read=True)

    def _notify(self) -> None:
        with self.table.changed:
            self.table.changed.notify_all()

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
                    slot.lease_until = max(slot.lease_until, at + ttl)
            self.table.changed.notify_all()

    def lease_lost(self, ckey: str, token: int, status: int) -> None:
        """The heartbeat found this claim held by another node (or released): stop now."""
        with self.table.lock:
            slot = self.table.slots.get(ckey)
            if slot is None or slot.token != token or slot.state is State.CLAIMING:
                return
            if slot.lost:
                return
            self._begin_stop(slot, lost=True)
        # the stop runs already: a log handler that blocks cannot hold it up
        log.warning(
            "node %s lost its claim of %r (%s); stopping it",
            self.node.node_id,
            slot.config.id,
            "gone" if status == ClaimStatus.RELEASED else "held by another node",
        )
        self.node.emit(Event(EventType.LEASE_LOST, self.node.node_id, slot.config.id, token))
        self.wake(read=True)

    def unhealthy(self, slot: Slot, instance: Any, error: Optional[BaseException]) -> None:
        """The health loop found this instance unhealthy: disconnect and recreate it."""
        with self.table.lock:
            if self.table.slots.get(slot.ckey) is not slot or slot.instance is not instance:
                return
            if slot.state is not State.RUNNING or self._closing:
                return
            slot.healthy = False
            token = slot.token
            self._begin_stop(slot, recreate=slot.config)
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
                elif self._take_stop(slot):
                    victims.append(slot)
            self._need_read = True
        for slot in victims:
            self._spawn_stop(slot)
        log.warning(
            "node %s could not renew its claims for %.2fs: stopping %d instances",
            node.node_id,
            node.settings.renew_deadline,
            len(victims),
        )
        node.set_leader(None)
        node.emit(Event(EventType.FENCED, node.node_id, data={"stopped": len(victims)}))
        self._notify()

    def unfence(self) -> None:
        with self.table.lock:
            self.node.fenced = False
        log.warning("node %s renewed again; resuming", self.node.node_id)
        self.wake(read=True)

    # -- the loop -----------------------------------------------------------------------

    def tick(self) -> float:
        node = self.node
        interval = node.settings.heartbeat_interval
        if self._unstarted:
            self._retry_stops()
        if self._unstarted_creates:
            self._retry_creates()
        if node.fenced or self._closing:
            return interval
        read = self._need_read
        if self._need_read:
            self._need_read = False
            with self.table.lock:
                handled = list(self.table.slots)
            try:
                version, raw, placements = node.store.read_desired(node.node_id, handled)
            except BaseException:
                self._need_read = True
                raise
            desired = {}
            for ckey, text in raw.items():
                config = decode(ckey, text)
                if config is not None:
                    desired[ckey] = config
            with self.table.lock:
                self.table.desired = desired
                self._placements = placements
                self._read_version = version
                self._have_read = True
            # what we just read is the truth as of now; the heartbeat moves it on later
            node.version = version
            self._release_orphans()
        to_claim = self._plan(retry_all=read)
        if to_claim:
            s = node.settings
            with self.claims_lock:
                # a claim we are about to release must go first, or the claim script
                # would find it still held
                self._flush_releases()
                sent = node.clock()
                tokens = node.store.claim(node.node_id, to_claim, s.create_lease, node.session)
                self._claimed(tokens, sent)
        self._notify()
        return interval

    def _plan(self, retry_all: bool) -> list[str]:
        """Start/stop what the desired set says; return the config keys to claim.

        Pending claims are all retried after a read and once per heartbeat interval;
        in between, a ``released`` hint retries only the claims it names, so a node
        waiting for many claims does not ask for all of them on every release.
        """
        now = self.node.clock()
        with self.table.lock:
            if self._closing or self.node.fenced:
                return []
            for ckey, slot in list(self.table.slots.items()):
                want = self.table.desired.get(ckey)
                if want is None and slot.state is not State.CLAIMING and self._keep(ckey):
                    continue
                if want is None:
                    if slot.state is State.CLAIMING:
                        del self.table.slots[ckey]
                    else:
                        self._begin_stop(slot)
                elif slot.state is State.RUNNING and want.json != slot.config.json:
                    log.info("config %r changed; recreating its instance", want.id)
                    self._begin_stop(slot, recreate=want)
                elif slot.state is State.CLAIMING and want.json != slot.config.json:
                    slot.config = want
            for ckey, config in self.table.desired.items():
                if ckey not in self.table.slots:
                    self.table.slots[ckey] = Slot(config)
            hinted, self._hinted = self._hinted, set()
            everything = retry_all or now >= self._retry_all_at
            if everything:
                self._retry_all_at = now + self.node.settings.heartbeat_interval
            return [
                c
                for c, s in self.table.slots.items()
                if s.state is State.CLAIMING and s.retry_at <= now and (everything or c in hinted)
            ]

    def _release_orphans(self) -> None:
        """Let go of the claims a fence dropped (those still wanted are claimed anew)."""
        with self.claims_lock:
            with self.table.lock:
                orphans, self._orphans = self._orphans, {}
            if orphans:
                self._release(orphans)

    def _keep(self, ckey: str) -> bool:
        """Keep running a config that is not in our desired set?

        Only while nobody else is meant to run it and it still exists: after Redis lost
        or rewound its data (no version yet, or a reset window) or while a new leader
        rebuilds the placement from the claims, a config is briefly unassigned or
        assigned by stale data, and stopping it then would move it for nothing. A config
        assigned elsewhere, or removed, stops.
        """
        if self._read_version is None:
            return True
        placement = self._placements.get(ckey)
        if placement is None:
            return False
        if self.node.store.era.resetting() or placement.contested:
            return placement.config_json is not None
        return (
            placement.node is None and placement.config_json is not None and not placement.waiting
        )

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
                    or self._closing
                    or node.fenced
                    or ckey not in self.table.desired
                ):
                    lost.append((ckey, token))  # taken but no longer wanted: give back
                    continue
                slot.claimed(token, sent + s.create_lease)
                start.append((slot, token))
        for slot, token in start:
            self._start_create(slot, token)
        if lost:
            self._release(dict(lost))

    def _begin_stop(
        self,
        slot: Slot,
        *,
        lost: bool = False,
        recreate: Optional[Config] = None,
    ) -> None:
        """Under the lock: move a slot towards STOPPING.

        ``lost``: the claim is not ours any more; ``recreate``: create it again after the
        disconnect. The disconnect starts at once on a thread of its own: a stop never
        queues behind creates that hang (the claim is held until it returns).
        """
        slot.cancel.set()
        if lost:
            slot.lost = True
        if recreate is None or slot.lost:
            slot.recreate = None
        if slot.state is State.RUNNING:
            slot.recreate = None if slot.lost else recreate
            self._take_stop(slot)
            self._spawn_stop(slot)
        # STOPPING: its disconnect runs already; CREATING: the create task sees the
        # cancel and disposes of what it makes

    def _take_stop(self, slot: Slot) -> bool:
        """Under the lock: claim the disconnect of a RUNNING or STOPPING slot for the
        caller; False if it is taken already (or there is no instance)."""
        return slot.take_stop()

    # -- worker tasks -------------------------------------------------------------------

    def _guard(self, task: Callable[..., None], *args: Any) -> None:
        try:
            task(*args)
        except BaseException as exc:  # a worker thread must survive anything
            if self.node.stop_event.is_set() and isinstance(
                exc, (redis.RedisError, OSError, ValueError)
            ):
                # stop() closed the connections under a task it no longer waits for
                log.debug("node %s: %s ended by stop(): %r", self.node.node_id, task.__name__, exc)
                return
            log.exception("node %s: worker task %s raised", self.node.node_id, task.__name__)
            self.node.emit(
                Event(EventType.LOOP_ERROR, self.node.node_id, error=exc, data={"loop": "worker"})
            )
        finally:
            self._notify()
            self.wake()

    def _spawn_stop(self, slot: Slot) -> None:
        """Run the disconnect of a slot now, on a thread of its own (the caller took it).

        Never raises: when no thread can be started (the process is at its thread limit),
        the slot waits for its disconnect again and every tick of this loop retries it,
        fenced or not. Its claim is held meanwhile (renewed, or left to expire when
        fenced), so nobody else starts the config while the instance may run.
        """
        try:
            self._tasks.start(self._stop_task, slot)
        except Exception as exc:  # RuntimeError: can't start new thread; MemoryError
            with self.table.lock:
                slot.disconnecting = False
                self._unstarted.append(slot)
                self._unstarted_error = exc

    def _start_create(self, slot: Slot, token: int) -> None:
        """Hand the create of a claimed slot to the worker pool. Never raises: when no
        worker thread can be started, every tick of this loop tries again (the work item
        may also still run once a worker starts: :meth:`_create_task` runs only the first
        of the two)."""
        try:
            self._pool.submit(self._guard, self._create_task, slot, token)
        except Exception as exc:  # RuntimeError: can't start new thread; MemoryError
            with self.table.lock:
                self._unstarted_creates.append((slot, token))
                self._unstarted_error = exc

    def _retry_creates(self) -> None:
        with self.table.lock:
            pending, self._unstarted_creates = self._unstarted_creates, []
            error = self._unstarted_error
            retry = [
                (slot, token)
                for slot, token in pending
                if self.table.slots.get(slot.ckey) is slot
                and slot.state is State.CREATING
                and slot.token == token
                and slot.create_for != token
            ]
        if retry:
            log.error(
                "node %s could not start a thread to create %r (%r); trying again",
                self.node.node_id,
                [slot.config.id for slot, _ in retry],
                error,
            )
        for slot, token in retry:
            self._start_create(slot, token)

    def _retry_stops(self) -> None:
        with self.table.lock:
            slots, self._unstarted = self._unstarted, []
            error = self._unstarted_error
            retry = [s for s in slots if self.table.slots.get(s.ckey) is s and self._take_stop(s)]
        if retry:
            log.error(
                "node %s could not start a thread to disconnect %r (%r); trying again",
                self.node.node_id,
                [s.config.id for s in retry],
                error,
            )
        for slot in retry:
            self._spawn_stop(slot)

    def _stop_task(self, slot: Slot) -> None:
        block_signals()
        self._guard(self._run_stop, slot)

    def _run_stop(self, slot: Slot) -> None:
        """Disconnect the slot's instance; then recreate it (new token) or finish it."""
        self.calls.disconnect(slot.config, slot.instance, slot.token)
        with self.table.lock:
            slot.stopped()
            again = (
                slot.recreate is not None
                and self.table.slots.get(slot.ckey) is slot
                and slot.token is not None
                and not slot.lost
                and not self._closing
                and not self.node.fenced
                and slot.ckey in self.table.desired
            )
            if again:
                slot.recreating(self.table.desired[slot.ckey])
            slot.recreate = None
        if again and self._retoken(slot):
            self._create_task(slot)
        else:
            self._finish(slot)

    def _retoken(self, slot: Slot) -> bool:
        """Give a slot recreated in place a new token (a new incarnation); False if the
        claim is lost or Redis cannot say."""
        node = self.node
        s = node.settings
        with self.claims_lock:
            sent = node.clock()
            assert slot.token is not None
            try:
                token = node.store.retoken(node.node_id, slot.ckey, slot.token, s.create_lease)
            except redis.RedisError as exc:
                log.warning(
                    "node %s could not renew the token of %r: %r", node.node_id, slot.config.id, exc
                )
                token = -1
            with self.table.lock:
                if token > 0:
                    slot.retokened(token, sent + s.create_lease)
                    return True
                if token == 0:
                    slot.lost = True
                return False

    def _wait_covered(self, slot: Slot, cancel: threading.Event) -> bool:
        """Wait until the claim is sure to outlive a create attempt started now and the
        disconnect of what it returns; False if the attempt may not start at all."""
        node = self.node
        s = node.settings
        need = s.create_timeout + s.disconnect_timeout + s.fence_margin
        with self.table.changed:
            while True:
                if cancel.is_set() or node.fenced or slot.lost or node.stop_event.is_set():
                    return False
                if node.clock() + need <= slot.lease_until:
                    return True
                # the next heartbeat renews this claim for a whole create_lease
                self.table.changed.wait(s.heartbeat_interval)

    def _create_once(self, slot: Slot, cancel: threading.Event) -> Any:
        if slot.timed_out:
            # the last attempt overran create_timeout and may still return an instance
            # (disconnected when it does): this one is another incarnation, with a new
            # token, so that downstream can tell the two apart
            if not self._retoken(slot):
                raise Cancelled()
            slot.timed_out = False
        if not self._wait_covered(slot, cancel):
            raise Cancelled()
        try:
            return self.calls.create(slot.config)
        except CallTimeout:
            slot.timed_out = True
            raise

    def _create_task(self, slot: Slot, token: Optional[int] = None) -> None:
        """Create the slot's instance (under ``token``: the slot's current one when None),
        with retries; a second task for the same token does nothing."""
        node = self.node
        with self.table.lock:
            token = slot.token if token is None else token
            if slot.token != token or slot.create_for == token:
                return  # a create task for this incarnation ran already
            slot.create_for = token
        cancel = slot.cancel
        retrying = self.calls.retrying(cancel, slot.config.id, lambda: slot.token)
        try:
            instance = retrying(self._create_once, slot, cancel)
        except Cancelled:
            self._finish(slot)
            return
        except Exception as exc:
            self._create_failed(slot, exc, cancel)
            return
        with self.table.lock:
            keep = (
                self.table.slots.get(slot.ckey) is slot
                and slot.state is State.CREATING
                and not cancel.is_set()
                and not slot.lost
                and not node.fenced
                and not self._closing
            )
            if keep:
                slot.created(instance)
        if keep:
            log.debug("node %s created %r (token %s)", node.node_id, slot.config.id, slot.token)
            node.emit(Event(EventType.INSTANCE_CREATED, node.node_id, slot.config.id, slot.token))
            return
        # moved away, fenced or stopping while we created: undo, then let go of the claim
        self.calls.disconnect(slot.config, instance, slot.token)
        self._finish(slot)

    def _create_failed(self, slot: Slot, exc: BaseException, cancel: threading.Event) -> None:
        node = self.node
        with self.table.lock:
            current = (
                self.table.slots.get(slot.ckey) is slot
                and not cancel.is_set()
                and not slot.lost
                and not node.fenced
                and not self._closing
            )
        if not current:
            self._finish(slot)
            return
        log.error(
            "node %s gives up creating config %r after %d attempts: %r; handing it over for %.0fs",
            node.node_id,
            slot.config.id,
            node.settings.create_attempts,
            exc,
            node.settings.failure_cooldown,
        )
        node.emit(
            Event(EventType.INSTANCE_FAILED, node.node_id, slot.config.id, slot.token, error=exc)
        )
        token = slot.token
        with self.claims_lock:
            with self.table.lock:
                slot.gave_up(node.clock() + node.settings.failure_cooldown)
            if token is not None:
                self._release({slot.ckey: token})
        node.store.report_failure(
            node.node_id,
            slot.ckey,
            node.settings.failure_cooldown,
            Message.failed(node.node_id, (slot.ckey,)),
        )
        node.leader.mark_dirty()  # when this node leads, it hears no hint of its own

    def _finish(self, slot: Slot) -> None:
        """The slot's instance is gone: forget it and let go of its claim.

        Releases are group-committed: while one worker's release is in flight (holding
        claims_lock), the workers finishing meanwhile queue theirs, and the next one
        through releases the whole queue in one round trip with one hint. Once the slot
        is gone no heartbeat renews the claim, and a release never runs while a
        heartbeat is in flight (claims_lock), so a released claim is never taken back.
        A fenced node keeps the claim as an orphan, released once Redis answers.
        """
        token = slot.token
        flush = False
        with self.table.lock:
            if self.table.slots.get(slot.ckey) is slot:
                del self.table.slots[slot.ckey]
            if token is not None and not slot.lost:
                if self.node.fenced:
                    self._orphans[slot.ckey] = token
                else:
                    self._releasing[slot.ckey] = token
                    flush = True
            self.table.changed.notify_all()
        if flush:
            self._flush_releases()

    def _flush_releases(self) -> None:
        with self.claims_lock:
            with self.table.lock:
                batch, self._releasing = self._releasing, {}
            if batch:
                self._release(batch)

    def _release(self, tokens: dict[str, int]) -> None:
        """Delete claims; callers hold claims_lock and have already dropped the slots."""
        node = self.node
        try:
            node.store.release(node.node_id, tokens, Message.released(node.node_id, tokens))
        except redis.RedisError as exc:
            # the claims lapse by TTL since nobody renews them any more
            log.warning(
                "node %s could not release %d claims (they will expire): %r",
                node.node_id,
                len(tokens),
                exc,
            )

    # -- shutdown -------------------------------------------------------------------------

    def begin_close(self) -> None:
        """Take no new claims and start nothing new (the first step of a graceful stop)."""
        with self.table.lock:
            self._closing = True

    def close(self, timeout: float) -> None:
        """Graceful stop: start every disconnect at once, release each claim as soon as
        its instance is down, and wait for them at most ``timeout``."""
        node = self.node
        with self.table.lock:
            self._closing = True
            victims = []
            for ckey, slot in list(self.table.slots.items()):
                slot.cancel.set()
                slot.recreate = None
                if slot.state is State.CLAIMING:
                    del self.table.slots[ckey]
                elif self._take_stop(slot):
                    victims.append(slot)
        for slot in victims:
            self._spawn_stop(slot)
        deadline = node.clock() + timeout
        with self.table.changed:
            while self.table.slots and node.clock() < deadline:
                self.table.changed.wait(min(0.05, max(0.0, deadline - node.clock())))
        self._pool.shutdown(wait=False)
        self.calls.close()
        self._tasks.close()
        self._release_orphans()
        with self.table.lock:
            left = list(self.table.slots.values())
        if left:
            log.warning(
                "node %s stopped with %d instances still busy: %s",
                node.node_id,
                len(left),
                [s.config.id for s in left],
            )
