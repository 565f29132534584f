"""Faults of the network: every proxy stalled past node_ttl, added latency, and one
node stalled around its renew deadline while its disconnects (and creates) are slow."""

from __future__ import annotations

import time
from typing import Any

from dim.testing import wait_until
from tools.chaos.harness import RunBase
from tools.chaos.ledger import Record

__all__ = ["NetworkFaults"]


class NetworkFaults(RunBase):
    """The ``fault_*`` methods of this group (see :data:`tools.chaos.model.FAULTS`)."""

    def fault_proxy_stall(self) -> None:
        t0 = time.monotonic()
        proxies = list(self.proxies.values())
        for proxy in proxies:
            proxy.stall()
        try:
            self._wait_fenced(t0, set(self.base), 1.5 * self.options.node_ttl)
        finally:
            for proxy in proxies:
                proxy.resume()
        t1 = time.monotonic()
        self._fault("proxy_stall", t0, t1, set(self.base), stalled=t1 - t0)

    def fault_slow_redis(self) -> None:
        o = self.options
        # round trips grow by 2 * (latency + up to jitter): up to 0.4 of a socket timeout
        socket_timeout = max(o.heartbeat_interval, 0.25)
        latency, jitter = socket_timeout * 0.08, socket_timeout * 0.12
        t0 = time.monotonic()
        proxies = list(self.proxies.values())
        for proxy in proxies:
            proxy.set_latency(latency, jitter)
        try:
            self._hold(t0, max(2.0, 2 * o.node_ttl))
        finally:
            for proxy in proxies:
                proxy.set_latency(0.0)
        self._fault(
            "slow_redis", t0, time.monotonic(), set(self.base), latency=latency, jitter=jitter
        )

    def fault_fence_stall(self) -> None:
        """One node's network stalls for renew_deadline +- 2 heartbeats while its
        disconnects are slow: the heal lands just before the fence, just after it, or
        while the fence's disconnects run. In the ``creating`` variant two of its
        configs are being recreated (slow creates) when the stall begins, so creates
        are in flight at the fence too."""
        o, b = self.options, self.bounds
        victim = self._victim(leader=self.rng.random() < 0.3)
        offset = self.rng.uniform(-2 * o.heartbeat_interval, 2 * o.heartbeat_interval)
        stall = b.renew_deadline + offset
        slow = self.rng.uniform(0.3, 0.8) * o.disconnect_timeout
        variant = self.rng.choice(["running", "creating"])
        rules: Record = {"disconnect_delay": {"pids": [victim], "seconds": slow}}
        ids: list[Any] = []
        creating = 0.0
        mark = 0.0
        if variant == "creating":
            ids = self._running_on(victim, 2)
            creating = self.rng.uniform(0.3, 0.6) * o.create_timeout
            rules["create_delay"] = {"pids": [victim], "seconds": creating}
            mark = time.monotonic()
            self._control(**rules, unhealthy={"ids": ids, "pids": [victim]})

            def recreating() -> bool:
                self._check_crashes()
                return any(
                    iv.pid == victim and iv.cid in ids and iv.start > mark
                    for iv in self._procs.view().intervals
                )

            try:
                wait_until(recreating, o.settle_timeout, 0.002)
            except TimeoutError:
                self._say(f"configs {ids} of pid {victim} were not recreated")
        proxy = self.proxies[victim]
        t0 = time.monotonic()
        # the fault began when it made instances recreate: their gaps are its own
        began = mark if variant == "creating" else t0
        proxy.stall()
        try:
            self._control(**rules)  # no more unhealthy instances
            self._hold(t0, stall)
        finally:
            proxy.resume()
        healed = time.monotonic()
        try:
            self._wait_disconnects()
        finally:
            self._control()
        fenced = [
            float(r["t"])
            for r in self._procs.view().events
            if r.get("type") == "fenced" and r["pid"] == victim and r["t"] > t0
        ]
        self._fault(
            "fence_stall",
            began,
            healed,
            set(self.base),
            pid=victim,
            variant=variant,
            stall=healed - t0,
            offset=healed - t0 - b.renew_deadline,
            fenced=(min(fenced) - t0) if fenced else None,
            disconnect=slow,
            create=creating,
            ids=ids,
        )
