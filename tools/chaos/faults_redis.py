"""Faults of Redis: restarted empty, down past node_ttl, restarted from a stale
snapshot, writes lost to an earlier DUMP, a failover to a lagging replica, and a
Sentinel failover in the middle of moves."""

from __future__ import annotations

import threading
import time
from typing import Any

import redis

from dim.testing import wait_until
from tools.chaos.harness import HarnessError, RunBase
from tools.chaos.sentinel import SENTINEL_MASTER, SentinelProcess, redis_command, redis_info

__all__ = ["RedisFaults"]


class RedisFaults(RunBase):
    """The ``fault_*`` methods of this group (see :data:`tools.chaos.model.FAULTS`)."""

    def fault_redis_restart(self) -> None:
        t0 = time.monotonic()
        self._forget_snapshot()
        self.redis.restart()
        t1 = time.monotonic()
        reset = self._wait_reset(t0)
        self._fault("redis_restart", t0, t1, set(self.base), reset_seen=reset)

    def fault_redis_outage(self) -> None:
        t0 = time.monotonic()
        self.redis.stop()
        self._forget_snapshot()
        self._wait_fenced(t0, set(self.base), 1.5 * self.options.node_ttl)
        self.redis.start()
        t1 = time.monotonic()
        reset = self._wait_reset(t1)
        self._fault("redis_outage", t0, t1, set(self.base), down=t1 - t0, reset_seen=reset)

    def fault_stale_snapshot(self) -> None:
        t0 = time.monotonic()
        self._client.save()
        how, undo = self._change_placement()
        killed = time.monotonic()
        self.redis.kill()
        self.redis.start()  # the same port and directory: it loads the stale dump.rdb
        back = time.monotonic()
        self._forget_snapshot()
        self._new_client()
        loaded = int(self._client.dbsize())
        reset = self._wait_reset(killed)
        self._fault(
            "stale_snapshot",
            t0,
            back,
            set(self.base),
            change=how,
            keys_loaded=loaded,
            stale_for=killed - t0,
            reset_seen=reset,
            blackout=[[killed, back]],
        )
        undo()

    def fault_lost_writes(self) -> None:
        t0 = time.monotonic()
        snapshot, taken = self._dump_keys()
        how, undo = self._change_placement()
        counts = self._restore_keys(snapshot, taken)
        t1 = time.monotonic()
        reset = self._wait_reset(t1)
        self._fault(
            "lost_writes",
            t0,
            t1,
            set(self.base),
            change=how,
            rewound_by=t1 - taken,
            reset_seen=reset,
            **counts,
        )
        undo()

    def fault_replica_failover(self) -> None:
        t0 = time.monotonic()
        replica = self._start_replica()
        replica.pause()  # SIGSTOP: it lags from here on
        lagging = time.monotonic()
        try:
            how, undo = self._change_placement()
        except BaseException:
            replica.resume()
            raise
        killed = time.monotonic()
        self.redis.kill()
        replica.resume()
        self._promote(replica)
        promoted = time.monotonic()
        reset = self._wait_reset(killed)
        self._fault(
            "replica_failover",
            t0,
            promoted,
            set(self.base),
            change=how,
            lag=killed - lagging,
            port=replica.port,
            reset_seen=reset,
            blackout=[[killed, promoted]],
        )
        undo()

    def fault_sentinel_failover(self) -> None:
        o = self.options
        t0 = time.monotonic()
        old = self.redis
        replica = self._start_replica()
        seq = len(self.sentinels)
        sentinels = [SentinelProcess(self.dir / f"sentinel-{seq + i}", old.port) for i in range(3)]
        self.sentinels += sentinels
        try:
            wait_until(
                lambda: all(s.ready(len(sentinels) - 1) for s in sentinels),
                30.0,
                0.05,
                "the Sentinels did not find the replica and each other",
            )
            how = self.rng.choice(["failover", "kill"])
            before = set(self._procs.view().ready)
            t_spawn = time.monotonic()
            spawned: dict[str, Any] = {}
            where = ",".join(s.address for s in sentinels)

            def spawn_burst() -> None:
                try:
                    spawned["pids"] = self._procs.spawn(
                        o.sentinel_burst, "--sentinel", where, "--sentinel-master", SENTINEL_MASTER
                    )
                except BaseException as exc:  # reported below
                    spawned["error"] = exc

            spawner = threading.Thread(target=spawn_burst, name="sentinel-burst", daemon=True)
            spawner.start()

            def moving() -> bool:
                # a node of the burst has started creating: moves are under way (no
                # crash check here: the spawning thread is changing the process table)
                view = self._procs.view()
                return (
                    any(iv.start > t_spawn and iv.pid not in before for iv in view.intervals)
                    or "error" in spawned
                )

            try:
                wait_until(moving, o.settle_timeout, 0.005)
            except TimeoutError:
                self._say("the Sentinel burst never started moving configs")
            triggered = time.monotonic()
            if how == "failover":
                redis_command(sentinels[0].client, "SENTINEL", "FAILOVER", SENTINEL_MASTER)
            else:
                old.kill()

            def switched() -> bool:
                if any(s.master_port() != replica.port for s in sentinels[:1]):
                    return False
                try:
                    with replica.client(socket_timeout=1.0) as c:
                        return redis_info(c, "replication").get("role") == "master"
                except redis.RedisError:
                    return False

            wait_until(switched, 60.0, 0.005, "Sentinel did not fail the master over")
            announced = time.monotonic()
            blackout = [[triggered, announced]] if how == "kill" else []
            if how == "failover":
                # The nodes behind the proxies behave like Sentinel clients: they keep
                # their connections to the old master until it stops taking writes
                # (Sentinel converts it to a replica of the new one: READONLY, then a
                # reconnect to the master Sentinel names). Moving them at once would
                # split the cluster over two writable masters, as no Sentinel client
                # would.
                def converted() -> bool:
                    try:
                        with old.client(socket_timeout=1.0) as c:
                            return redis_info(c, "replication").get("role") != "master"
                    except redis.RedisError:
                        return True

                wait_until(converted, 60.0, 0.005, "Sentinel never converted the old master")
                blackout = [[time.monotonic(), time.monotonic()]]
            self._repoint(replica)
            self._forget_snapshot(replica)
            repointed = time.monotonic()
            blackout[-1][1] = repointed
            reset = self._wait_reset(triggered)
            spawner.join(o.settle_timeout)
            if "error" in spawned:
                raise HarnessError(f"the Sentinel burst did not start: {spawned['error']!r}")
            burst = list(spawned.get("pids", []))
            self.base |= set(burst)
            self._fault(
                "sentinel_failover",
                t0,
                repointed,
                set(self.base),
                how=how,
                burst=burst,
                failover_took=announced - triggered,
                old_master_writable=repointed - triggered,
                port=replica.port,
                reset_seen=reset,
                blackout=blackout,
            )
            self._leave(burst)
        finally:
            for s in sentinels:
                s.stop()
            if self.redis is not old:
                old.stop()  # demoted to a replica of the new master (or dead already)
