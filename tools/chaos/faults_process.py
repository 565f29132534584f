"""Faults of node processes: kill -9 of a follower or of the leader, a graceful
restart, SIGSTOP past node_ttl, a burst of joins (and its leave)."""

from __future__ import annotations

import time

from dim.testing import wait_until
from tools.chaos.harness import RunBase

__all__ = ["ProcessFaults"]


class ProcessFaults(RunBase):
    """The ``fault_*`` methods of this group (see :data:`tools.chaos.model.FAULTS`)."""

    def fault_kill_node(self) -> None:
        self._kill(leader=False)

    def fault_kill_leader(self) -> None:
        self._kill(leader=True)

    def _kill(self, leader: bool) -> None:
        victim = self._victim(leader)
        sent, reaped = self._kill9(victim)
        kind = "kill_leader" if leader else "kill_node"
        self._fault(kind, sent, reaped, set(self.base), pid=victim)
        self._replace()

    def fault_restart_node(self) -> None:
        victim = self.rng.choice(sorted(self.base))
        was_leader = victim == self._leader()
        t0 = time.monotonic()
        code = self._terminate([victim], "restart")[victim]
        new = set(self._spawn(1))
        self.base |= new
        self._fault(
            "restart_node",
            t0,
            time.monotonic(),
            set(self.base),
            pid=victim,
            leader=was_leader,
            code=code,
            new=sorted(new),
        )

    def fault_pause_node(self) -> None:
        victim = self._victim(leader=self.rng.random() < 0.5)
        was_leader = victim == self._leader()
        others = self.base - {victim}
        procs = self._procs
        stopped = procs.stop_proc(victim)
        try:

            def taken_over() -> bool:
                self._check_crashes()
                running = procs.view().running(others)
                return (
                    time.monotonic() - stopped > 1.5 * self.options.node_ttl
                    and set(running) == set(procs.config_ids)
                    and all(len(w) == 1 for w in running.values())
                )

            try:
                wait_until(taken_over, self.options.settle_timeout, 0.02)
            except TimeoutError:
                self._say(f"the others did not take over while pid {victim} was stopped")
        finally:
            resumed = procs.cont_proc(victim)
        node = procs.view().ready.get(victim)
        self.harness.write(ev="paused", pid=victim, node=node, t_stop=stopped, t_cont=resumed)
        self._fault(
            "pause_node",
            stopped,
            resumed,
            set(self.base),
            pid=victim,
            leader=was_leader,
            frozen=resumed - stopped,
        )

    def fault_join_burst(self) -> None:
        t0 = time.monotonic()
        burst = set(self._spawn(self.options.burst))
        everyone = self.base | burst
        self._fault("join_burst", t0, time.monotonic(), everyone, pids=sorted(burst))
        self._pause_quietly()
        t1 = time.monotonic()
        codes = self._terminate(sorted(burst), "leave_burst")
        self._fault("leave_burst", t1, time.monotonic(), set(self.base), codes=codes)
