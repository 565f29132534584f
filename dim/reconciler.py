"""The local instance table: claims, creates, disconnects (§4.4, §4.6, §4.7).

Each config this node deals with has a :class:`Slot` that moves through these states:

``CLAIMING``
    Assigned here, claim not yet taken (another node still holds it, or a cool-down
    after failures is running). The reconciler retries on every ``released`` hint and
    every heartbeat interval.
``CREATING``
    Claim held; ``create`` runs on a worker (with tenacity retries and backoff).
``RUNNING``
    Claim held, instance up.
``STOPPING``
    Claim held (or lost), ``disconnect`` runs on a worker; then the claim is released.

Transitions happen under one lock; ``create``/``disconnect`` run outside it on a bounded
pool of workers, each call on its own thread with a timeout (:mod:`dim.usercode`). A slot
is identified by object identity: a worker that finishes checks that its slot is still
the current one (``self._slots[ckey] is slot``) and not cancelled before installing an
instance; otherwise it disposes of what it made. The claim is always held while an
instance may exist, and released only after ``disconnect`` returned (break-before-make).
"""

from __future__ import annotations

import concurrent.futures
import enum
import logging
import threading
from typing import TYPE_CHECKING, Any, Callable, Optional

import attrs
import redis
import tenacity

from dim.configs import Config, decode
from dim.errors import CreateError
from dim.events import Event, EventType
from dim.loop import Loop
from dim.messages import Kind, Message
from dim.store import Placement
from dim.usercode import Runners, block_signals

if TYPE_CHECKING:
    from dim.node import Node

log = logging.getLogger(__name__)


class State(enum.Enum):
    CLAIMING = "claiming"
    CREATING = "creating"
    RUNNING = "running"
    STOPPING = "stopping"


@attrs.frozen
class Lease:
    """The right to run one config, as held by this node.

    :ivar config_id: the config.
    :ivar token: the fencing token: it only grows for a config across owners and across
        Redis restarts, so a downstream system that remembers the highest token it has
        seen can reject a stale owner.
    :ivar node_id: the node holding it.
    """

    config_id: Any
    token: int
    node_id: str


@attrs.define(eq=False)
class Slot:
    config: Config
    state: State = State.CLAIMING
    token: Optional[int] = None
    instance: Any = None
    retry_at: float = 0.0
    healthy: Optional[bool] = None
    cancel: threading.Event = attrs.field(factory=threading.Event)

    @property
    def ckey(self) -> str:
        return self.config.ckey


@attrs.frozen
class UserCallbacks:
    create: Callable[[Any], Any]
    disconnect: Optional[Callable[[Any], Any]]
    healthcheck: Optional[Callable[[Any], Any]]


class Reconciler(Loop):
    """Owns the local instance table and makes it match this node's desired set."""

    role = "reconciler"

    def __init__(self, node: Node, callbacks: UserCallbacks) -> None:
        super().__init__(node)
        self.callbacks = callbacks
        self._lock = threading.RLock()
        # Held around every Redis call that takes, renews or releases claims (claim,
        # heartbeat, release), so a renewal never races a release; always taken
        # before self._lock, never after.
        self.claims_lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._slots: dict[str, Slot] = {}
        self._desired: dict[str, Config] = {}
        self._placements: dict[str, Placement] = {}
        self._orphans: dict[str, int] = {}  # claims dropped by a fence, maybe still in Redis
        self._releasing: dict[str, int] = {}  # disconnected, claim not yet released
        self._hinted: set[str] = set()  # claims announced as released since the last try
        self._retry_all_at = 0.0  # when to retry every pending claim, hint or not
        self._read_version: Optional[str] = None
        self._have_read = False
        self._need_read = True
        self._closing = False
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=node.settings.max_workers,
            thread_name_prefix=f"dim-worker-{node.node_id}",
            initializer=block_signals,
        )
        # the threads that run create/disconnect calls, each with its timeout
        self._runners = Runners(f"dim-call-{node.node_id}", keep=node.settings.max_workers)

    def __repr__(self) -> str:
        with self._lock:
            counts: dict[str, int] = {}
            for slot in self._slots.values():
                counts[slot.state.value] = counts.get(slot.state.value, 0) + 1
        return f"<Reconciler node={self.node.node_id} {counts}>"

    # -- views (any thread) -----------------------------------------------------------

    def held_claims(self) -> dict[str, int]:
        """Claims this node holds now (ckey -> token), for the heartbeat to renew."""
        with self._lock:
            return {
                c: s.token
                for c, s in self._slots.items()
                if s.token is not None and s.state is not State.CLAIMING
            }

    def health(self) -> tuple[int, int]:
        """(instances running here, configs being recreated after a failed health check)."""
        with self._lock:
            running = sum(1 for s in self._slots.values() if s.state is State.RUNNING)
            return running, sum(1 for s in self._slots.values() if s.healthy is False)

    def instances(self) -> dict[Any, Any]:
        with self._lock:
            return {
                s.config.id: s.instance for s in self._slots.values() if s.state is State.RUNNING
            }

    def running(self) -> list[tuple[Slot, Any]]:
        with self._lock:
            return [(s, s.instance) for s in self._slots.values() if s.state is State.RUNNING]

    def leases(self) -> dict[Any, Lease]:
        with self._lock:
            return {
                s.config.id: Lease(s.config.id, s.token, self.node.node_id)
                for s in self._slots.values()
                if s.token is not None and s.state is not State.CLAIMING
            }

    def local_view(self) -> dict[Any, dict[str, Any]]:
        with self._lock:
            return {
                s.config.id: {"state": s.state.value, "token": s.token, "healthy": s.healthy}
                for s in self._slots.values()
            }

    def is_stable(self) -> bool:
        """True when this node runs exactly its share of the latest assignment."""
        node = self.node
        with self._lock:
            if node.fenced or self._need_read or not self._have_read:
                return False
            if self._read_version is None or self._read_version != node.version:
                return False
            if self._read_version == node.joined_version:
                return False  # the leader has not placed anything since we joined
            if set(self._slots) != set(self._desired):
                return False
            return all(
                s.state is State.RUNNING and s.config.json == self._desired[c].json
                for c, s in self._slots.items()
            )

    def wait_until_stable(self, timeout: float) -> bool:
        deadline = self.node.clock() + timeout
        with self._changed:
            while not self.is_stable():
                remaining = deadline - self.node.clock()
                if remaining <= 0 or self.node.stop_event.is_set():
                    return False
                self._changed.wait(min(remaining, self.node.settings.heartbeat_interval))
            return True

    # -- signals from other loops -----------------------------------------------------

    def wake(self, read: bool = False) -> None:
        if read:
            self._need_read = True
        super().wake()

    def released(self, ckeys: tuple[str, ...]) -> None:
        """Another node released claims: retry ours now if we wait for one of them."""
        with self._lock:
            waiting = {c for c, s in self._slots.items() if s.state is State.CLAIMING}
            if not waiting or (ckeys and waiting.isdisjoint(ckeys)):
                return
            if ckeys:
                self._hinted.update(ckeys)
            else:
                self._retry_all_at = 0.0  # some claim was freed: retry them all
        self.wake()

    def assigned(self, version: Optional[int], targets: tuple[str, ...]) -> None:
        """The leader wrote a new assignment version; ``targets`` are the nodes whose
        share it changed (empty: not said).

        A node not named skips the read if it had read the version just before and
        handles nothing outside its share: its share is the same.
        """
        node = self.node
        if version is None or not targets or node.node_id in targets:
            self.wake(read=True)
            return
        with self._lock:
            same = (
                not self._need_read
                and self._read_version is not None
                and self._read_version == str(version - 1)
                and node.version in (None, self._read_version, str(version))
                and self._slots.keys() == self._desired.keys()
            )
            if same:
                self._read_version = str(version)
                node.version = str(version)
        if same:
            self._notify()
        else:
            self.wake(read=True)

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def lease_lost(self, ckey: str, token: int) -> None:
        """The heartbeat found this claim held by another node: stop at once."""
        with self._lock:
            slot = self._slots.get(ckey)
            if slot is None or slot.token != token or slot.state is State.CLAIMING:
                return
            log.warning(
                "node %s lost its claim of %r (taken or gone); stopping it",
                self.node.node_id,
                slot.config.id,
            )
            self.node.emit(Event(EventType.LEASE_LOST, self.node.node_id, slot.config.id, token))
            slot.token = None  # not ours any more: never released, never renewed
            self._begin_stop(slot, release=False)
        self.wake(read=True)

    def unhealthy(self, slot: Slot, instance: Any, error: Optional[BaseException]) -> None:
        """The health loop found this instance unhealthy: disconnect and recreate it."""
        with self._lock:
            if self._slots.get(slot.ckey) is not slot or slot.instance is not instance:
                return
            if slot.state is not State.RUNNING or self._closing:
                return
            slot.healthy = False
            self.node.emit(
                Event(
                    EventType.INSTANCE_UNHEALTHY,
                    self.node.node_id,
                    slot.config.id,
                    slot.token,
                    error=error,
                )
            )
            slot.state = State.STOPPING
            self._pool.submit(self._guard, self._stop_task, slot, slot.instance, False, True)

    def fence(self) -> None:
        """Renewals failed too long: stop every instance now, without touching Redis."""
        node = self.node
        with self._lock:
            if node.fenced:
                return
            node.fenced = True
            victims = []
            for ckey, slot in list(self._slots.items()):
                slot.cancel.set()
                if slot.state is State.RUNNING:
                    victims.append((slot, slot.instance))
                if slot.state is not State.STOPPING:
                    del self._slots[ckey]
                    if slot.token is not None:
                        # not renewed any more; released once Redis answers, unless we
                        # are still meant to run it (then the claim script hands it back)
                        self._orphans[ckey] = slot.token
            self._need_read = True
        log.warning(
            "node %s could not renew its claims for %.2fs: stopping %d instances",
            node.node_id,
            node.settings.renew_deadline,
            len(victims),
        )
        node.set_leader(None)
        node.emit(Event(EventType.FENCED, node.node_id, data={"stopped": len(victims)}))
        self._disconnect_many(victims)
        self._notify()

    def unfence(self) -> None:
        with self._lock:
            self.node.fenced = False
        log.warning("node %s renewed again; resuming", self.node.node_id)
        self.wake(read=True)

    # -- the loop -----------------------------------------------------------------------

    def tick(self) -> float:
        node = self.node
        interval = node.settings.heartbeat_interval
        if node.fenced or self._closing:
            return interval
        read = self._need_read
        if self._need_read:
            self._need_read = False
            with self._lock:
                handled = list(self._slots)
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
            with self._lock:
                self._desired = desired
                self._placements = placements
                self._read_version = version
                self._have_read = True
            # what we just read is the truth as of now; the heartbeat moves it on later
            node.version = version
            self._release_orphans(keep=set(desired))
        to_claim = self._plan(retry_all=read)
        if to_claim:
            with self.claims_lock:
                # a claim we are about to release must go first, or the claim script
                # would hand the old token to the new slot
                self._flush_releases()
                tokens = node.store.claim(
                    node.node_id, to_claim, node.settings.node_ttl, node.session
                )
                self._claimed(tokens)
        self._notify()
        return interval

    def _plan(self, retry_all: bool) -> list[str]:
        """Start/stop what the desired set says; return the config keys to claim.

        Pending claims are all retried after a read and once per heartbeat interval;
        in between, a ``released`` hint retries only the claims it names, so a node
        waiting for many claims does not ask for all of them on every release.
        """
        now = self.node.clock()
        with self._lock:
            if self._closing or self.node.fenced:
                return []
            for ckey, slot in list(self._slots.items()):
                want = self._desired.get(ckey)
                if want is None and slot.state is not State.CLAIMING and self._keep(ckey):
                    continue
                if want is None:
                    if slot.state is State.CLAIMING:
                        del self._slots[ckey]
                    elif slot.state is State.RUNNING:
                        self._begin_stop(slot, release=True)
                    elif slot.state is State.CREATING:
                        slot.cancel.set()
                elif slot.state is State.RUNNING and want.json != slot.config.json:
                    log.info("config %r changed; recreating its instance", want.id)
                    slot.state = State.STOPPING
                    self._pool.submit(
                        self._guard, self._stop_task, slot, slot.instance, False, True, want
                    )
                elif slot.state is State.CLAIMING and want.json != slot.config.json:
                    slot.config = want
            for ckey, config in self._desired.items():
                if ckey not in self._slots:
                    self._slots[ckey] = Slot(config)
            hinted, self._hinted = self._hinted, set()
            everything = retry_all or now >= self._retry_all_at
            if everything:
                self._retry_all_at = now + self.node.settings.heartbeat_interval
            return [
                c
                for c, s in self._slots.items()
                if s.state is State.CLAIMING and s.retry_at <= now and (everything or c in hinted)
            ]

    def _release_orphans(self, keep: set[str]) -> None:
        """Let go of claims a fence dropped, except those we are meant to run again."""
        with self.claims_lock:
            with self._lock:
                orphans = {c: t for c, t in self._orphans.items() if c not in keep}
                self._orphans.clear()
            if orphans:
                self._release(orphans)

    def _keep(self, ckey: str) -> bool:
        """Keep running a config that is not in our desired set?

        Only while nobody else is meant to run it and it still exists: after Redis lost
        its data (no version yet) or while a new leader rebuilds the placement from the
        claims, a config is briefly unassigned, and stopping it then would move it for
        nothing. A config assigned elsewhere, or removed, stops.
        """
        if self._read_version is None:
            return True
        placement = self._placements.get(ckey)
        if placement is None:
            return False
        return (
            placement.node is None and placement.config_json is not None and not placement.waiting
        )

    def _claimed(self, tokens: dict[str, int]) -> None:
        lost: list[tuple[str, int]] = []
        with self._lock:
            for ckey, token in tokens.items():
                slot = self._slots.get(ckey)
                if token <= 0:
                    continue
                if (
                    slot is None
                    or slot.state is not State.CLAIMING
                    or self._closing
                    or self.node.fenced
                    or ckey not in self._desired
                ):
                    if slot is None or slot.state is State.CLAIMING:
                        lost.append((ckey, token))  # taken but no longer wanted: give back
                    continue
                slot.token = token
                slot.state = State.CREATING
                slot.cancel = threading.Event()
                self._pool.submit(self._guard, self._create_task, slot)
        if lost:
            self._release(dict(lost))

    def _begin_stop(self, slot: Slot, release: bool) -> None:
        """Under the lock: move a RUNNING or CREATING slot towards STOPPING."""
        slot.cancel.set()
        if slot.state is State.RUNNING:
            slot.state = State.STOPPING
            self._pool.submit(self._guard, self._stop_task, slot, slot.instance, release, False)
        elif slot.state is State.CREATING and not release:
            slot.state = State.STOPPING  # the create task disposes of what it makes

    # -- worker tasks -------------------------------------------------------------------

    def _guard(self, task: Callable[..., None], *args: Any) -> None:
        try:
            task(*args)
        except Exception as exc:
            log.exception("node %s: worker task %s raised", self.node.node_id, task.__name__)
            self.node.emit(
                Event(EventType.LOOP_ERROR, self.node.node_id, error=exc, data={"loop": "worker"})
            )
        finally:
            self._notify()
            self.wake()

    def _create_once(self, slot: Slot) -> Any:
        config = slot.config
        instance = self._runners.call(
            self.callbacks.create,
            config.value,
            self.node.settings.create_timeout,
            f"dim-create-{self.node.node_id}",
            on_late=lambda late: self._dispose_late(config, late),
        )
        if instance is None:
            raise CreateError(f"create returned None for config id {config.id!r}", config.id)
        return instance

    def _create_task(self, slot: Slot) -> None:
        node = self.node
        s = node.settings

        def before_sleep(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            log.warning(
                "create of config %r failed (attempt %d of %d): %r",
                slot.config.id,
                state.attempt_number,
                s.create_attempts,
                error,
            )
            node.emit(
                Event(
                    EventType.CREATE_FAILED,
                    node.node_id,
                    slot.config.id,
                    slot.token,
                    error=error,
                    data={"attempt": state.attempt_number},
                )
            )

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(s.create_attempts)
            | tenacity.stop_when_event_set(slot.cancel),
            wait=tenacity.wait_exponential(multiplier=s.create_backoff, max=s.create_backoff_max),
            sleep=tenacity.sleep_using_event(slot.cancel),
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            instance = retrying(self._create_once, slot)
        except Exception as exc:
            self._create_failed(slot, exc)
            return
        with self._lock:
            keep = (
                self._slots.get(slot.ckey) is slot
                and slot.state is State.CREATING
                and not slot.cancel.is_set()
                and not node.fenced
            )
            if keep:
                slot.instance = instance
                slot.state = State.RUNNING
                slot.healthy = None
        if keep:
            log.debug("node %s created %r (token %s)", node.node_id, slot.config.id, slot.token)
            node.emit(Event(EventType.INSTANCE_CREATED, node.node_id, slot.config.id, slot.token))
            return
        # moved away, fenced or stopping while we created: undo, then let go of the claim
        self._disconnect(slot.config, instance, slot.token)
        self._finish(slot, release=slot.token is not None and not node.fenced)

    def _create_failed(self, slot: Slot, exc: BaseException) -> None:
        node = self.node
        with self._lock:
            current = self._slots.get(slot.ckey) is slot and not slot.cancel.is_set()
        if not current:
            self._finish(slot, release=slot.token is not None and not node.fenced)
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
            with self._lock:
                slot.state = State.CLAIMING
                slot.token = None
                slot.retry_at = node.clock() + node.settings.failure_cooldown
            if token is not None:
                self._release({slot.ckey: token})
        node.store.report_failure(
            node.node_id,
            slot.ckey,
            node.settings.failure_cooldown,
            Message(Kind.FAILED, node.node_id, ckeys=(slot.ckey,)),
        )
        node.leader.mark_dirty()  # when this node leads, it hears no hint of its own

    def _stop_task(
        self,
        slot: Slot,
        instance: Any,
        release: bool,
        recreate: bool,
        new_config: Optional[Config] = None,
    ) -> None:
        self._disconnect(slot.config, instance, slot.token)
        with self._lock:
            slot.instance = None
            again = (
                recreate
                and self._slots.get(slot.ckey) is slot
                and slot.token is not None
                and not self._closing
                and not self.node.fenced
                and slot.ckey in self._desired
            )
            if again:
                if new_config is not None:
                    slot.config = self._desired.get(slot.ckey, new_config)
                slot.state = State.CREATING
                slot.cancel = threading.Event()
        if again:
            self._create_task(slot)
        else:
            self._finish(slot, release=(release or recreate) and slot.token is not None)

    def _finish(self, slot: Slot, release: bool) -> None:
        """The slot's instance is gone: forget it and release its claim (if asked).

        Releases are group-committed: while one worker's release is in flight (holding
        claims_lock), the workers finishing meanwhile queue theirs, and the next one
        through releases the whole queue in one round trip with one hint. Once the slot
        is gone no heartbeat renews the claim, and a release never runs while a
        heartbeat is in flight (claims_lock), so a released claim is never taken back.
        """
        token = slot.token
        with self._lock:
            if self._slots.get(slot.ckey) is slot:
                del self._slots[slot.ckey]
            if release and token is not None:
                self._releasing[slot.ckey] = token
        if release and token is not None:
            self._flush_releases()

    def _flush_releases(self) -> None:
        with self.claims_lock:
            with self._lock:
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

    def _disconnect(self, config: Config, instance: Any, token: Optional[int]) -> None:
        node = self.node
        error: Optional[BaseException] = None
        if self.callbacks.disconnect is not None:
            try:
                self._runners.call(
                    self.callbacks.disconnect,
                    instance,
                    node.settings.disconnect_timeout,
                    f"dim-disconnect-{node.node_id}",
                )
            except Exception as exc:
                error = exc
                log.warning("disconnect of config %r raised or hung: %r", config.id, exc)
        node.emit(
            Event(EventType.INSTANCE_DISCONNECTED, node.node_id, config.id, token, error=error)
        )

    def _disconnect_many(self, victims: list[tuple[Slot, Any]]) -> None:
        """Disconnect several instances at once (fence, shutdown), bounded in time."""
        threads = [
            threading.Thread(
                target=self._disconnect_in_thread,
                args=(slot.config, inst, slot.token),
                name=f"dim-disconnect-{self.node.node_id}",
                daemon=True,
            )
            for slot, inst in victims
        ]
        for t in threads:
            t.start()
        deadline = self.node.clock() + self.node.settings.disconnect_timeout + 1
        for t in threads:
            t.join(max(0.0, deadline - self.node.clock()))

    def _disconnect_in_thread(self, config: Config, instance: Any, token: Optional[int]) -> None:
        block_signals()
        self._disconnect(config, instance, token)

    def _dispose_late(self, config: Config, instance: Any) -> None:
        if instance is None:
            return
        log.warning(
            "create of config %r returned after its timeout; disconnecting the late instance",
            config.id,
        )
        self._disconnect(config, instance, None)

    # -- shutdown -------------------------------------------------------------------------

    def begin_close(self) -> None:
        """Take no new claims and start nothing new (the first step of a graceful stop)."""
        with self._lock:
            self._closing = True

    def close(self, timeout: float) -> None:
        """Graceful stop: disconnect everything, releasing each claim as soon as it can."""
        node = self.node
        with self._lock:
            self._closing = True
            victims = []
            for ckey, slot in list(self._slots.items()):
                slot.cancel.set()
                if slot.state is State.RUNNING:
                    slot.state = State.STOPPING
                    victims.append(slot)
                elif slot.state is State.CLAIMING:
                    del self._slots[ckey]
        futures = []
        for slot in victims:
            try:
                futures.append(
                    self._pool.submit(
                        self._guard, self._stop_task, slot, slot.instance, True, False
                    )
                )
            except RuntimeError:
                # the interpreter is exiting and has shut the pools: stop it here
                self._guard(self._stop_task, slot, slot.instance, True, False)
        deadline = node.clock() + timeout
        with self._changed:
            while self._slots and node.clock() < deadline:
                self._changed.wait(min(0.05, max(0.0, deadline - node.clock())))
        concurrent.futures.wait(futures, timeout=max(0.0, deadline - node.clock()))
        self._pool.shutdown(wait=False)
        self._runners.close()
        self._release_orphans(keep=set())
        with self._lock:
            left = list(self._slots.values())
        if left:
            log.warning(
                "node %s stopped with %d instances still busy: %s",
                node.node_id,
                len(left),
                [s.config.id for s in left],
            )
