"""The create and stop tasks of slots, on worker threads: the lifecycle of an instance.

:class:`Lifecycle` owns the worker pool (creates, at most ``max_workers`` at once) and
the stop threads (never bounded: a stop never waits for a worker), and the tasks that
could not get a thread (retried on every tick of the reconciler). A create attempt
starts only while the claim is sure to outlive it and the disconnect of what it
returns; a task whose slot was cancelled meanwhile undoes what it made and lets go of
the claim. The reconciler (:mod:`dim.reconciler`) decides what starts and stops; this
module carries it out.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Callable, Optional

import redis

from dim.claims import ClaimBook
from dim.configs import Config
from dim.errors import CallTimeout
from dim.events import Event, EventType
from dim.instances import Cancelled, InstanceCalls, NotStarted, Overran
from dim.logs import NodeLog, fields
from dim.messages import Message
from dim.renewal import covers
from dim.slots import Slot, State, TransitionError
from dim.table import SlotTable
from dim.usercode import Place, Runners, Workers, block_signals

if TYPE_CHECKING:
    from dim.node import Node

log = logging.getLogger("dim.reconciler")


class Lifecycle:
    def __init__(
        self,
        node: Node,
        table: SlotTable,
        calls: InstanceCalls,
        claims: ClaimBook,
        wake: Callable[[], None],
        gave_up: Callable[[], None],
    ) -> None:
        self.node = node
        self._log = NodeLog(log, node.node_id)
        self.table = table
        self.calls = calls
        self.claims = claims
        self._wake = wake  # the reconciler: look at the table again
        self._gave_up = gave_up  # the leader: a config was handed over (failures hash)
        # stops whose thread could not be started (the process is at its thread limit):
        # every tick tries them again, fenced or not
        self._unstarted: list[Slot] = []
        self._unstarted_error: Optional[BaseException] = None
        self._stops_due = 0.0  # not retried before then
        # a graceful stop is past its deadline: no tick retries a stop any more, so a stop
        # that cannot get a thread runs where it is
        self._final = False
        # the create tasks: at most max_workers at once, each calling create itself,
        # timed by the calls' watchdog (a create that overruns gives its place up); a
        # task whose thread could not be started waits, and every tick tries again
        workers = node.settings.max_workers
        # one pool of idle threads (at most max_workers of each kind) for both kinds of
        # task: a stop takes a thread a create left idle (the node that leaves stops its
        # instances at once, and each thread it had to start cost its stop() ~0.13 ms of
        # CPU and a wait for the new thread to run), never the other way round
        self._threads = Runners(f"dim-worker-{node.node_id}", keep=workers)
        self._workers = Workers(self._threads.name, workers, self._threads)
        # the stop tasks: never bounded, so no stop waits for a worker; each runs its
        # disconnect itself, timed by the calls' watchdog, which lets go of the claims of
        # those that overrun in one round trip
        self._stop_name = f"dim-stop-{node.node_id}"
        calls.watchdog.after = self._release_overruns

    @property
    def pending(self) -> bool:
        """Some task waits for a thread, or some claim for its release or settle."""
        return bool(
            self._unstarted
            or self._workers.stalled
            or self.claims.queued
            or self.claims.settling
            or self.calls.reports_pending
        )

    def retry(self) -> None:
        """On every tick while :attr:`pending`: the stops and creates that could not get
        a thread, the releases whose thread could not start (overruns'), the claims of
        creates that returned (a lease from now), and the overruns' log lines that found
        no thread."""
        self.retry_stops()
        self.retry_creates()
        if self.claims.queued:
            self.claims.flush()
        if self.claims.settling:
            self.claims.settle(self.node.settings.lease, self._running)
            self.table.notify()  # (stable only once settled)
        self.calls.flush_reports()

    def _running(self, tokens: dict[str, int]) -> dict[str, int]:
        """Those of ``tokens`` whose slot still runs its instance under that token (a
        fenced or finished one's claim is let go, not kept a lease more)."""
        with self.table.lock:
            if self.node.fenced:
                return {}
            slots = self.table.slots
            return {
                c: t
                for c, t in tokens.items()
                if c in slots and slots[c].token == t and slots[c].state is State.RUNNING
            }

    def close(self) -> None:
        self._threads.close()
        self.calls.close()

    def _guard(self, task: Callable[..., None], *args: Any) -> None:
        try:
            task(*args)
        except TransitionError as exc:
            # a bug in dim: rather than strand the slot (in CREATING, its claim renewed
            # forever, the config running nowhere), let it and its claim go, before
            # anything is logged; the reconciler claims the config anew. Only creating
            # slots get here: no instance of theirs exists.
            slot = args[0] if args and isinstance(args[0], Slot) else None
            if slot is not None and slot.instance is None:
                self.finish(slot)
            self._log.error("node %s: %s; letting the slot go", self.node.node_id, exc)
            self.node.emit(
                Event(EventType.LOOP_ERROR, self.node.node_id, error=exc, data={"loop": "worker"})
            )
        except BaseException as exc:  # a worker thread must survive anything
            if self.node.stop_event.is_set() and isinstance(
                exc, (redis.RedisError, OSError, ValueError)
            ):
                # stop() closed the connections under a task it no longer waits for
                self._log.debug(
                    "node %s: %s ended by stop(): %r", self.node.node_id, task.__name__, exc
                )
                return
            self._log.exception("node %s: worker task %s raised", self.node.node_id, task.__name__)
            self.node.emit(
                Event(EventType.LOOP_ERROR, self.node.node_id, error=exc, data={"loop": "worker"})
            )
        finally:
            self.table.notify()
            self._wake()

    def begin_stop(
        self,
        slot: Slot,
        *,
        lost: bool = False,
        recreate: Optional[Config] = None,
    ) -> None:
        """Under the table's lock: move a slot towards STOPPING.

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
            slot.take_stop()
            self.spawn_stop(slot)
        # STOPPING: its disconnect runs already; CREATING: the create task sees the
        # cancel and disposes of what it makes

    def spawn_stop(self, slot: Slot, take: bool = False) -> None:
        """Run the disconnect of a slot now, on a thread of its own (the caller took it;
        ``take``: the thread takes it, unless someone did first. A caller that a signal
        handler may interrupt between two slots, stop() on the main thread, so leaves
        none taken and not started: its next pass starts what is left once more).

        Never raises: when no thread can be started (the process is at its thread limit),
        the slot waits for its disconnect again and the reconciler retries it once per
        heartbeat, fenced or not. Its claim is held meanwhile, renewed, so nobody else
        starts the config while the instance may run. When fenced, nobody renews it:
        a stop that gets no thread within ``disconnect_timeout + fence_margin`` of the
        fence lets the claim lapse under the instance (protocol.rst §14.1, "a process
        out of threads"; running it on the reconciler instead was tried and reverted:
        one disconnect that hangs there blocks the node for good).
        """
        task = self._take_stop_task if take else self._stop_task
        try:
            self._threads.start(task, slot, name=self._stop_name, borrow=True)
        except Exception as exc:  # RuntimeError: can't start new thread; MemoryError
            if not self._stop_later(slot, exc, take):
                self._guard(self._run_stop, slot, True)

    def _take_stop(self, slot: Slot) -> bool:
        """Under the table's lock: take the disconnect of a slot still in the table."""
        return self.table.slots.get(slot.ckey) is slot and slot.take_stop()

    def _stop_later(self, slot: Slot, error: BaseException, take: bool = False) -> bool:
        """The disconnect of the slot could not start: it waits for a tick to retry it.
        False if no tick will (a graceful stop is past its deadline): the caller runs it.
        ``take``: the caller did not take it; taken here, in the same lock as it is
        queued (True, nothing to run, if someone took it first)."""
        with self.table.lock:
            if take and not self._take_stop(slot):
                return True
            if self._final:
                return False
            slot.disconnecting = False
            self._unstarted.append(slot)
            self._unstarted_error = error
            return True

    def start_create(self, slot: Slot, token: int, first: bool = False) -> None:
        """Hand the create of a claimed slot to the workers (at most ``max_workers`` run
        at once; the others wait their turn, ``first``: before the others). Never raises:
        a create whose thread cannot be started waits, and every tick of the reconciler
        tries again (a second task for the same incarnation does nothing:
        :meth:`_create_task`)."""

        def task(place: Place) -> None:
            self._guard(self._create_task, slot, token, place)

        try:
            self._workers.submit(task, first)
        except Exception:  # RuntimeError: can't start new thread; MemoryError
            pass  # the task waits, and every tick of the reconciler tries again

    def retry_creates(self) -> None:
        """Creates wait while a worker place is free (their thread could not be
        started): start them now, and say so when that fails again."""
        if not self._workers.stalled:
            return
        try:
            self._workers.kick()
        except Exception as exc:  # RuntimeError: can't start new thread; MemoryError
            self._log.error(
                "node %s could not start a thread to create an instance (%r); trying again",
                self.node.node_id,
                exc,
            )

    def retry_stops(self) -> None:
        """Try the stops that could not start again, at most once per heartbeat (a stop
        whose disconnect could not start wakes the reconciler: no busy loop)."""
        now = self.node.clock()
        with self.table.lock:
            if not self._unstarted or now < self._stops_due:
                return
            self._stops_due = now + self.node.settings.heartbeat_interval
            slots, self._unstarted = self._unstarted, []
            error = self._unstarted_error
            retry = [s for s in slots if self.table.slots.get(s.ckey) is s and s.take_stop()]
        if retry:
            self._log.error(
                "node %s could not start a thread to disconnect %r (%r); trying again",
                self.node.node_id,
                [s.config.id for s in retry],
                error,
            )
        for slot in retry:
            self.spawn_stop(slot)

    def wait_stopped(self, deadline: float) -> None:
        """The end of a graceful stop: wait until every slot is gone, at most until
        ``deadline``. The disconnects still waiting for a thread then start once more, and
        one that gets no thread runs where it is (this thread, or its stop thread),
        without a time limit, rather than not at all (the instance would run on, its
        claim left to lapse under it); this waits for them."""
        clock = self.node.clock
        with self.table.changed:
            while self.table.slots and clock() < deadline:
                self.table.changed.wait(min(0.05, max(0.0, deadline - clock())))
            self._final = True
            slots, self._unstarted = self._unstarted, []
            last = [s for s in slots if self.table.slots.get(s.ckey) is s and s.stop_free()]
        for slot in last:
            # taken on its thread, as in Reconciler.close: interrupted here, this leaves
            # none taken and not started (stop()'s next pass starts the rest)
            self.spawn_stop(slot, take=True)
        with self.table.changed:
            while any(self.table.slots.get(s.ckey) is s for s in last):
                self.table.changed.wait(0.05)

    def _release_overruns(self) -> None:
        """On the watchdog, after a batch of overruns: their claims go in one round trip,
        on a stop thread (a Redis call here would make the watchdog late for the next
        deadline while Redis is slow). Without a thread, the reconciler's next tick
        releases them (:meth:`retry`)."""
        if not self.claims.queued:
            return  # creates that overran: they let no claim go
        try:
            self._threads.start(
                self._release_task, None, inline=False, name=self._stop_name, borrow=True
            )
        except Exception:  # RuntimeError: can't start new thread; MemoryError
            pass  # queued: the reconciler's tick releases them (nothing logged here: a
            # log handler may block, and the watchdog times every create and disconnect)

    def _release_task(self, _: None) -> None:
        try:
            self.claims.flush()
        except Exception:
            self._log.exception("node %s: releasing claims failed", self.node.node_id)

    def _overran(self, slot: Slot) -> None:
        """On the watchdog: the slot's disconnect is past its deadline. The slot goes
        while the instance may still run (reported: ``DISCONNECT_TIMEOUT``); its claim is
        released with the batch, and a config still wanted here is claimed anew."""
        with self.table.lock:
            slot.stopped()
            slot.recreate = None
            self.finish(slot, flush=False)
        self._wake()

    def _stop_task(self, slot: Slot) -> None:
        block_signals()
        self._guard(self._run_stop, slot)

    def _take_stop_task(self, slot: Slot) -> None:
        with self.table.lock:
            took = self._take_stop(slot)
        if took:
            self._stop_task(slot)

    def _run_stop(self, slot: Slot, last: bool = False) -> None:
        """Disconnect the slot's instance on this thread, timed by the watchdog (``last``:
        on a call thread with its timeout, or here without one when no thread starts);
        then recreate it (new token) or finish it."""
        config, instance, token = slot.config, slot.instance, slot.token
        try:
            if last:  # a call thread times it if one starts; else it runs here
                done = self.calls.disconnect(config, instance, token)
            else:
                overran = lambda: self._overran(slot)  # noqa: E731
                done = self.calls.disconnect(config, instance, token, overran=overran)
        except NotStarted as exc:  # no watchdog, or no call thread
            if last:
                done = self.calls.disconnect(config, instance, token, here=True)
            elif self._stop_later(slot, exc):
                return  # the instance runs: the claim stays held
            else:  # no tick will try again (stop() is past its deadline)
                self._run_stop(slot, True)
                return
        if not done:
            return  # it overran: the watchdog let the slot go at its deadline
        with self.table.lock:
            slot.stopped()
            again = (
                slot.recreate is not None
                and self.table.slots.get(slot.ckey) is slot
                and slot.token is not None
                and not slot.lost
                and not self.table.closing
                and not self.node.fenced
                and slot.ckey in self.table.desired
            )
            if again:
                slot.recreating(self.table.desired[slot.ckey])
            slot.recreate = None
        if again and self._retoken(slot):
            self._create_task(slot)
        else:
            self.finish(slot)

    def _retoken(self, slot: Slot) -> bool:
        """Give a slot recreated in place a new token (a new incarnation); False if the
        claim is lost or Redis cannot say."""
        node = self.node
        s = node.settings
        with self.claims.lock:
            sent = node.clock()
            assert slot.token is not None
            try:
                token = node.store.retoken(node.node_id, slot.ckey, slot.token, s.create_lease)
            except redis.RedisError as exc:
                self._log.warning(
                    "node %s could not renew the token of %r: %r",
                    node.node_id,
                    slot.config.id,
                    exc,
                    extra=fields(config=slot.config.id, token=slot.token),
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
                if covers(slot.lease_until, node.clock(), need):
                    return True
                # the next heartbeat renews this claim for a whole create_lease
                self.table.changed.wait(s.heartbeat_interval)

    def _create_once(self, slot: Slot, cancel: threading.Event, place: Optional[Place]) -> Any:
        if slot.timed_out:
            # the last attempt overran create_timeout and may still return an instance
            # (disconnected when it does): this one is another incarnation, with a new
            # token, so that downstream can tell the two apart
            if not self._retoken(slot):
                raise Cancelled()
            slot.timed_out = False
        if not self._wait_covered(slot, cancel):
            raise Cancelled()
        token = slot.token
        assert token is not None
        slot.attempts += 1
        try:
            return self.calls.create(
                slot.config, lambda exc: self._create_overran(slot, token, place, exc)
            )
        except CallTimeout:  # timed on a call thread (no watchdog): the task goes on here
            slot.timed_out = True
            raise

    def _create_overran(
        self, slot: Slot, token: int, place: Optional[Place], exc: CallTimeout
    ) -> None:
        """On the watchdog: the create attempt of ``slot`` under ``token`` is past
        ``create_timeout``. It failed: its thread gives up its worker place, and the task
        goes on from the next attempt on another (:meth:`_create_task`), while this one
        waits for ``create`` to return and disconnects what it returns."""
        with self.table.lock:
            slot.timed_out = True
            slot.overrun = exc
            slot.create_for = None  # the task may begin again for this token
        self.start_create(slot, token, first=True)  # (waits first in line for a place)
        if place is not None:
            self._workers.leave(place)

    def _create_task(
        self, slot: Slot, token: Optional[int] = None, place: Optional[Place] = None
    ) -> None:
        """Create the slot's instance (under ``token``: the slot's current one when None),
        with retries; a second task for the same token does nothing. A task that goes on
        after an attempt overran (on another thread) first reports that attempt."""
        node = self.node
        with self.table.lock:
            token = slot.token if token is None else token
            if slot.token != token or slot.create_for == token:
                return  # a create task for this incarnation runs already
            slot.create_for = token
            done, overrun = slot.attempts, slot.overrun
            slot.overrun = None
        cancel = slot.cancel
        if overrun is not None:
            done -= 1  # the overrun attempt is the first of this retry loop, reported

        def attempt() -> Any:
            nonlocal overrun
            if overrun is not None:
                error, overrun = overrun, None
                raise error
            return self._create_once(slot, cancel, place)

        retrying = self.calls.retrying(cancel, slot.config.id, lambda: slot.token, done)
        try:
            instance = retrying(attempt)
        except Overran:
            # its instance is disconnected; the task went on on another thread. The
            # place is given up here too (the watchdog may not have got to it yet), so
            # this thread takes no other task on it
            if place is not None:
                self._workers.leave(place)
            return
        except Cancelled:
            self.finish(slot)
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
                and not self.table.closing
            )
            if keep:
                slot.created(instance)
                assert slot.token is not None
                self.claims.settle_later(slot.ckey, slot.token)  # (sent by the next tick)
        if keep:
            self._log.debug(
                "node %s created %r (token %s)",
                node.node_id,
                slot.config.id,
                slot.token,
                extra=fields(config=slot.config.id, token=slot.token),
            )
            node.emit(Event(EventType.INSTANCE_CREATED, node.node_id, slot.config.id, slot.token))
            return
        # moved away, fenced or stopping while we created: undo, then let go of the claim
        with self.table.lock:
            held = self.table.slots.get(slot.ckey) is slot and slot.state is State.CREATING
            if held:  # stopped like any instance: the claim is held until it is down
                slot.created(instance)
                slot.recreate = None
                slot.take_stop()
        if held:
            self.spawn_stop(slot)
            return
        # (not reached while this task owns the slot: only its create task takes a
        # creating slot out of the table; the slot is not this task's to finish)
        try:
            self.calls.disconnect(slot.config, instance, token)
        except NotStarted:
            self.calls.disconnect(slot.config, instance, token, here=True)
        self._log.error(
            "node %s: the slot of %r left CREATING under its create task; what the task "
            "made was disconnected",
            node.node_id,
            slot.config.id,
        )

    def _create_failed(self, slot: Slot, exc: BaseException, cancel: threading.Event) -> None:
        node = self.node
        with self.table.lock:
            current = (
                self.table.slots.get(slot.ckey) is slot
                and not cancel.is_set()
                and not slot.lost
                and not node.fenced
                and not self.table.closing
            )
        if not current:
            self.finish(slot)
            return
        # the slot and its claim go first, then what may fail (Redis) or raise (a log
        # filter): nothing may leave the slot in CREATING with its claim renewed for good
        token = slot.token
        try:
            with self.claims.lock:
                with self.table.lock:
                    slot.gave_up(node.clock() + node.settings.failure_cooldown)
                if token is not None:
                    self.claims.release({slot.ckey: token})
            node.store.report_failure(
                node.node_id,
                slot.ckey,
                node.settings.failure_cooldown,
                Message.failed(node.node_id, (slot.ckey,)),
            )
            self._gave_up()  # when this node leads, it hears no hint of its own
        finally:
            node.emit(
                Event(EventType.INSTANCE_FAILED, node.node_id, slot.config.id, token, error=exc)
            )
            self._log.error(
                "node %s gives up creating config %r after %d attempts: %r; handing it over "
                "for %.0fs",
                node.node_id,
                slot.config.id,
                node.settings.create_attempts,
                exc,
                node.settings.failure_cooldown,
                extra=fields(config=slot.config.id, token=token),
            )

    def finish(self, slot: Slot, flush: bool = True) -> None:
        """The slot's instance is gone: forget it and let go of its claim.

        Once the slot is gone no heartbeat renews the claim, and a release never runs
        while a heartbeat is in flight (the claims lock), so a released claim is never
        taken back. A fenced node keeps the claim as an orphan, released once Redis
        answers (:class:`~dim.claims.ClaimBook`).
        """
        token = slot.token
        release = False
        with self.table.lock:
            if self.table.slots.get(slot.ckey) is slot:
                del self.table.slots[slot.ckey]
            if token is not None and not slot.lost:
                release = self.claims.queue(slot.ckey, token, self.node.fenced)
            self.table.changed.notify_all()
        if release and flush:
            self.claims.flush()
