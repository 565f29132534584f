"""Faults of user callbacks and clocks: get_config failing or hanging, create
failing, healthcheck hanging, slow callbacks, a disconnect overrunning
disconnect_timeout, BaseExceptions from every callback, a wall clock step."""

from __future__ import annotations

import time
from typing import Any, Optional

from dim.testing import wait_until
from tools.chaos.control import BASE_EXCEPTIONS
from tools.chaos.harness import HarnessError, RunBase

__all__ = ["CallbackFaults"]


class CallbackFaults(RunBase):
    """The ``fault_*`` methods of this group (see :data:`tools.chaos.model.FAULTS`)."""

    def fault_get_config_fail(self) -> None:
        o = self.options
        t0 = time.monotonic()
        self._control(get_config_error=True)
        try:
            # let the leader hit the failure a few times, then make a new leader face it
            self._hold(time.monotonic(), 2 * o.config_interval)
            leader = self._wait_leader()
            self._terminate([leader], "restart")
            self.base |= set(self._spawn(1))
            settled = self._wait_settled(set(self.base))
            if settled is None:
                self._say("not settled while get_config failed")
            self._hold(time.monotonic(), 2 * o.config_interval)
        finally:
            self._control()
        self._fault(
            "get_config_fail", t0, time.monotonic(), set(self.base), leader_restarted=leader
        )

    def fault_create_fail(self) -> None:
        victim = self.rng.choice(sorted(self.base))
        ids = self._running_on(victim, 3)
        t0 = time.monotonic()
        rule = {"ids": ids, "pids": [victim]}
        self._control(create_fail=rule, unhealthy=rule)
        try:
            self._wait_moved_off(victim, ids)
        finally:
            self._control()
        self._fault("create_fail", t0, time.monotonic(), set(self.base), pid=victim, ids=ids)

    def _wait_moved_off(self, victim: int, ids: list[Any]) -> None:
        def moved() -> bool:
            self._check_crashes()
            running = self._procs.view().running(self.base)
            return all(running.get(c, [victim]) != [victim] for c in ids)

        # dim should hand them over within the create bound: wait a little longer, then
        # let the checker report the gap rather than wait for ever
        o = self.options
        limit = self.bounds.create + o.slack + o.failure_cooldown + 5.0
        try:
            wait_until(moved, limit, 0.02)
        except TimeoutError:
            self._say(f"configs {ids} did not move off pid {victim} within {limit:.1f}s")

    def _wait_recycled(self, victim: int, ids: list[Any], since: float) -> None:
        before = {iv.inst for iv in self._procs.view().open_intervals({victim})}

        def recycled() -> bool:
            self._check_crashes()
            view = self._procs.view()
            fresh = {
                iv.cid
                for iv in view.intervals
                if iv.start > since and (iv.pid != victim or iv.inst not in before)
            }
            return set(ids) <= fresh

        try:
            wait_until(recycled, self.options.settle_timeout, 0.02)
        except TimeoutError:
            self._say(f"configs {ids} of pid {victim} were not recreated")

    def fault_healthcheck_hang(self) -> None:
        o = self.options
        victim = self.rng.choice(sorted(self.base))
        ids = self._running_on(victim, 3)
        t0 = time.monotonic()
        self._control(
            healthcheck_hang={
                "ids": ids,
                "pids": [victim],
                "seconds": 3 * o.healthcheck_timeout,
            }
        )
        try:
            self._hold(t0, 2 * o.healthcheck_interval)
            self._wait_recycled(victim, ids, t0)
        finally:
            self._control()
        self._fault("healthcheck_hang", t0, time.monotonic(), set(self.base), pid=victim, ids=ids)

    def fault_slow_callbacks(self) -> None:
        """create and disconnect slow (within their timeouts) everywhere, while two nodes
        join and then leave: every move pays both."""
        o = self.options
        create = self.rng.uniform(0.2, 0.6) * o.create_timeout
        disconnect = self.rng.uniform(0.3, 0.7) * o.disconnect_timeout
        slow = {"create_delay": {"seconds": create}, "disconnect_delay": {"seconds": disconnect}}
        t0 = time.monotonic()
        self._control(**slow)
        try:
            joined = self._spawn(2)
            self.base |= set(joined)
            if self._wait_settled(set(self.base)) is None:
                self._say("not settled after a join with slow callbacks")
            self._terminate(joined, "leave")
            if self._wait_settled(set(self.base)) is None:
                self._say("not settled after a leave with slow callbacks")
            self._wait_disconnects()
        finally:
            self._control()
        self._fault(
            "slow_callbacks",
            t0,
            time.monotonic(),
            set(self.base),
            create=create,
            disconnect=disconnect,
            joined=joined,
        )

    def fault_disconnect_overrun(self) -> None:
        """One node's disconnects overrun disconnect_timeout while some of its configs
        move: to a node that joins, to the same node (recreated after failing health
        checks), or anywhere (the node restarts gracefully)."""
        o = self.options
        victim = self._victim(leader=self.rng.random() < 0.3)
        seconds = o.disconnect_timeout + self.rng.uniform(0.5, 1.5)
        how = self.rng.choice(["join", "unhealthy", "restart"])
        slow = {"disconnect_delay": {"pids": [victim], "seconds": seconds}}
        t0 = time.monotonic()
        joined: list[int] = []
        ids: list[Any] = []
        self._control(**slow)
        try:
            if how == "join":
                joined = self._spawn(1)
                self.base |= set(joined)
            elif how == "unhealthy":
                ids = self._running_on(victim, 2)
                self._control(**slow, unhealthy={"ids": ids, "pids": [victim]})

                def called() -> bool:
                    self._check_crashes()
                    view = self._procs.view()
                    node = view.ready.get(victim)
                    hit = {
                        iv.cid
                        for iv in view.intervals
                        if iv.node == node and (iv.node, iv.inst) in view.disconnecting
                    }
                    return set(ids) <= hit

                try:
                    wait_until(called, o.settle_timeout, 0.02)
                except TimeoutError:
                    self._say(f"configs {ids} of pid {victim} were never disconnected")
                self._control(**slow)
            else:
                self._terminate([victim], "restart")
                self.base |= set(self._spawn(1))
            self._wait_disconnects()
        finally:
            self._control()
        self._fault(
            "disconnect_overrun",
            t0,
            time.monotonic(),
            set(self.base),
            pid=victim,
            how=how,
            seconds=seconds,
            ids=ids,
            joined=joined,
        )
        if joined:
            self._leave(joined)

    def fault_base_exceptions(self) -> None:
        """Every callback raises a BaseException for some configs (or calls): a health
        check (the instance is recreated), a create (the config goes elsewhere), every
        disconnect of one node (which then stops gracefully), and get_config."""
        excs = list(BASE_EXCEPTIONS)
        self.rng.shuffle(excs)
        where = dict(zip(("healthcheck", "create", "disconnect", "get_config"), excs))
        victim = self._victim()
        picked = self._running_on(victim, 2)
        if len(picked) < 2:
            raise HarnessError(f"pid {victim} runs fewer than 2 configs")
        checked, created = picked
        rules = {
            "healthcheck": {"ids": [checked], "pids": [victim], "exc": where["healthcheck"]},
            "create": {"ids": [created], "pids": [victim], "exc": where["create"]},
            "disconnect": {"pids": [victim], "exc": where["disconnect"]},
            "get_config": {"exc": where["get_config"]},
        }
        t0 = time.monotonic()
        self._control(**{"raise": rules, "unhealthy": {"ids": [created], "pids": [victim]}})
        try:
            self._wait_recycled(victim, [checked], t0)
            self._wait_moved_off(victim, [created])
            rules.pop("healthcheck")
            self._control(**{"raise": rules})
            code = self._terminate([victim], "restart")[victim]
            self.base |= set(self._spawn(1))
        finally:
            self._control()
        self._fault(
            "base_exceptions",
            t0,
            time.monotonic(),
            set(self.base),
            pid=victim,
            raised=where,
            healthcheck_id=checked,
            create_id=created,
            code=code,
        )

    def fault_get_config_hang(self) -> None:
        """get_config hangs past config_timeout on the leader while a node (maybe the
        leader) dies: the dead node's configs must move without get_config; once the
        hang is lifted get_config must be called again."""
        o = self.options
        hang = o.config_timeout + self.rng.uniform(1.0, 3.0)
        leader = self.rng.random() < 0.5
        t0 = time.monotonic()
        self._control(get_config_hang={"seconds": hang}, log_get_config=True)
        try:

            def hanging() -> bool:
                self._check_crashes()
                return any(
                    r["t"] > t0 and r.get("hang") for r in self._procs.view().get_config_calls
                )

            try:
                wait_until(hanging, o.settle_timeout, 0.02)
            except TimeoutError:
                self._say("the leader never called get_config")
            victim = self._victim(leader)
            self._kill9(victim)
            if self._wait_settled(set(self.base)) is None:
                self._say("not settled while get_config hung")
            cleared = time.monotonic()
            self._control(log_get_config=True)

            def resumed() -> Optional[float]:
                self._check_crashes()
                calls = self._procs.view().get_config_calls
                later = [float(r["t"]) for r in calls if r["t"] > cleared]
                return min(later) if later else None

            try:
                again = wait_until(resumed, o.settle_timeout, 0.02)
            except TimeoutError:
                again = None
                self._say("get_config was never called again after the hang")
        finally:
            self._control()
        self._fault(
            "get_config_hang",
            t0,
            cleared,
            set(self.base),
            pid=victim,
            leader=leader,
            hang=hang,
            cleared=cleared,
            resumed=None if again is None else again - cleared,
        )
        self._replace()

    def fault_wall_clock_step(self) -> None:
        """A node's wall clock steps an hour (forward or back), a node restarts (configs
        move to and from it), then the clock steps back to true time."""
        o = self.options
        victim = self._victim(leader=self.rng.random() < 0.5)
        first = self.rng.choice([3600.0, -3600.0])
        t0 = time.monotonic()

        def step(offset: float) -> float:
            seen = len(self._procs.view().records)
            self._control(wall_offset={"pids": [victim], "seconds": offset})

            def applied() -> Optional[float]:
                self._check_crashes()
                for r in self._procs.view().records[seen:]:
                    if (
                        r.get("ev") == "wall_offset"
                        and r["pid"] == victim
                        and r.get("offset") == offset
                    ):
                        return float(r["t"])
                return None

            at = wait_until(applied, 10.0, 0.01, "the wall clock was not stepped")
            assert at is not None
            return at

        try:
            stepped = step(first)
            other = self.rng.choice(sorted(self.base - {victim}))
            self._terminate([other], "restart")
            self.base |= set(self._spawn(1))
            if self._wait_settled(set(self.base)) is None:
                self._say("not settled with a stepped wall clock")
            self._hold(stepped, 2 * o.node_ttl)
            back = step(0.0)
            self._hold(back, 2 * o.node_ttl)
        finally:
            self._control()
        self._fault(
            "wall_clock_step",
            t0,
            time.monotonic(),
            set(self.base),
            pid=victim,
            first=first,
            restarted=other,
        )
