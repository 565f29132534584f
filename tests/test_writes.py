"""A large leader write goes in parts: no script holds Redis long enough for the other
nodes' heartbeats to fail, each part leaves Redis consistent, and a write cut short
(a refusal, a lost reply) leaves the leader working from what Redis holds."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable, Optional

import attrs
import pytest
import redis

from dim import Manager, plan, writer
from dim import node as node_module
from dim.change import Change, split, touched
from dim.keys import Keys
from dim.protocol import WriteRefused
from dim.store import Store
from dim.testing import RedisServer, wait_until

from .helpers import FAST, Cluster, leading

NODES = [f"n{i}" for i in range(20)]


def first_placement(configs: int) -> tuple[Change, dict[str, str]]:
    """The change of a first placement of ``configs`` configs over NODES."""
    assignment = {str(i): NODES[i % len(NODES)] for i in range(configs)}
    add: dict[str, list[str]] = {}
    for ckey, node in assignment.items():
        add.setdefault(node, []).append(ckey)
    change = Change(
        assign=dict(assignment),
        configs={c: f'[{c},{{"id":{c}}}]' for c in assignment},
        add=add,
        drop_nodes=["gone"],
        control_set={"absent n0": "1"},
    )
    return change, assignment


def test_split_keeps_each_config_whole_and_node_fields_last() -> None:
    """Each part holds at most about ``limit`` entries; the parts together are the
    change; every entry of one config is in one part; nodes dropped, failure records
    and control fields are in the last part only."""
    change, assignment = first_placement(1000)
    # a few configs placed elsewhere, and stale entries removed from other nodes' sets
    moved = {str(i): NODES[(i + 1) % len(NODES)] for i in range(0, 1000, 7)}
    assignment.update(moved)
    add: dict[str, list[str]] = {}
    for ckey, node in assignment.items():
        add.setdefault(node, []).append(ckey)
    change = Change(
        assign=dict(assignment),
        configs=change.configs,
        add=add,
        rem={"n3": ["5", "6"], "n4": ["7"]},
        unassign=["x1", "x2"],
        drop_configs=["x1"],
        unplaced={"x2": "no live node"},
        placeable=["9"],
        drop_nodes=["gone"],
        drop_failures=["n1 3"],
        control_set={"absent n0": "1"},
        control_del=["drain n2"],
    )
    parts = split(change, 100)
    assert change.size() // 100 <= len(parts) <= change.size() // 100 + 2
    assert all(p.size() <= 100 + 3 for p in parts)  # a config's entries are not cut
    assert sum(p.size() for p in parts) == change.size()
    for field in ("assign", "configs", "unplaced"):
        merged: dict[str, Any] = {}
        for p in parts:
            merged.update(getattr(p, field))
        assert merged == getattr(change, field)
    for field in ("unassign", "drop_configs", "placeable"):
        assert sorted(c for p in parts for c in getattr(p, field)) == sorted(getattr(change, field))
    for field in ("add", "rem"):
        pairs = {(n, c) for p in parts for n, cs in getattr(p, field).items() for c in cs}
        assert pairs == {(n, c) for n, cs in getattr(change, field).items() for c in cs}
    home = {}
    for i, p in enumerate(parts):
        for c in [*p.assign, *p.configs, *p.unassign, *p.unplaced, *p.placeable]:
            assert home.setdefault(c, i) == i, c
        for cs in [*p.add.values(), *p.rem.values()]:
            for c in cs:
                assert home.setdefault(c, i) == i, c
    for p in parts[:-1]:
        assert not (p.drop_nodes or p.drop_failures or p.control_set or p.control_del)
    assert parts[-1].drop_nodes == ["gone"] and parts[-1].control_del == ["drain n2"]
    # grouped by the node they join: a part concerns few nodes
    assert max(len(touched(p, assignment)) for p in parts[:-1]) <= 4
    assert split(change, change.size()) == [change]


def test_split_puts_each_node_that_gains_or_loses_a_little_in_few_parts() -> None:
    """When a node joins, each node giving it configs is in one or two parts; when a
    node leaves, so is each node taking its configs; when configs change where they
    run, so is each node running them (each finds one delta to read)."""
    joins = Change(
        assign={f"{n}-{i}": "new" for n in NODES for i in range(50)},
        add={"new": [f"{n}-{i}" for n in NODES for i in range(50)]},
        rem={n: [f"{n}-{i}" for i in range(50)] for n in NODES},
    )
    leaves = Change(
        assign={f"{n}-{i}": n for n in NODES for i in range(50)},
        add={n: [f"{n}-{i}" for i in range(50)] for n in NODES},
        rem={"old": [f"{n}-{i}" for n in NODES for i in range(50)]},
    )
    for change, busy in ((joins, "new"), (leaves, "old")):
        parts = split(change, 200)  # a node's 50 moves are 150 entries
        assert len(parts) >= 10
        for node in NODES:
            assert sum(node in p.add or node in p.rem for p in parts) <= 2, node
        assert sum(busy in p.add or busy in p.rem for p in parts) == len(parts)
    # every config's content changes, where it runs: each node's in one or two parts
    placed = {f"{n}-{i}": n for n in NODES for i in range(50)}
    edits = Change(configs={c: f'[{c!r},{{"v":2}}]' for c in sorted(placed)})
    parts = split(edits, 100, 0, placed)
    assert len(parts) >= 10
    for node in NODES:
        assert sum(node in touched(p, placed) for p in parts) <= 2, node


@pytest.fixture
def busy_limit(own_redis: RedisServer) -> Iterator[redis.Redis]:
    """A private server that answers BUSY once a script has run for 300 ms."""
    client = own_redis.client()
    client.config_set("busy-reply-threshold", 300)
    yield client
    client.close()


def probe(client: redis.Redis, stop: threading.Event, busy: list[str]) -> None:
    """What every other node does meanwhile: a command, again and again."""
    while not stop.is_set():
        try:
            client.ping()
        except redis.ResponseError as exc:
            busy.append(str(exc))


def test_a_large_write_never_holds_redis_busy(
    busy_limit: redis.Redis, own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first placement of 100,000 configs goes in parts: no other client is told BUSY
    while it runs, and afterwards Redis holds all of it (assignment, configs, each
    node's desired set, share version and delta), and the last part's node fields."""
    monkeypatch.setattr(writer, "PART", 5_000)
    service = "large"
    store = leading(busy_limit, service)
    keys = Keys(service)
    busy_limit.zadd(keys.nodes, {"gone": 1})
    change, assignment = first_placement(100_000)
    stop, busy = threading.Event(), []
    other = own_redis.client()
    thread = threading.Thread(target=probe, args=(other, stop, busy), daemon=True)
    thread.start()
    try:
        wrote = writer.write(store, "n0:5", change, assignment, NODES)
    finally:
        stop.set()
        thread.join(10)
        other.close()
    assert busy == []
    assert wrote.error is None and len(wrote.applied) == wrote.parts > 1 and wrote.version > 0
    assert busy_limit.hlen(keys.assignment) == 100_000
    assert busy_limit.hlen(keys.configs) == 100_000
    for node in NODES:
        assert busy_limit.scard(keys.desired(node)) == 100_000 // len(NODES)
    shares = {k.decode(): int(v) for k, v in busy_limit.hgetall(keys.shares).items()}
    assert set(shares) == set(NODES) and max(shares.values()) == wrote.version
    # each node reads its whole share: it held none before
    read = store.read_desired("n7", [])
    assert len(read.entries) == 5_000 and read.version == str(shares["n7"])
    assert busy_limit.zscore(keys.nodes, "gone") is None
    assert busy_limit.hget(keys.control, "absent n0") == b"1"


def test_a_write_refused_part_way_stops_and_says_how_far_it_got(
    redis_client: redis.Redis, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leader deposed between two parts writes nothing more: the parts before stand
    whole, each config either fully written or untouched."""
    monkeypatch.setattr(writer, "PART", 100)
    store = leading(redis_client, service)
    keys = Keys(service)
    change, assignment = first_placement(1000)
    real = Store.leader_write
    calls = []

    def depose_after_three(self: Store, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 4:
            redis_client.set(keys.leader, "n1:6")  # another node won the lead
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Store, "leader_write", depose_after_three)
    wrote = writer.write(store, "n0:5", change, assignment, NODES)
    assert wrote.version == WriteRefused.DEPOSED and len(wrote.applied) == 3 and wrote.partial
    written = {k.decode(): v.decode() for k, v in redis_client.hgetall(keys.assignment).items()}
    assert 0 < len(written) < 1000
    for ckey, node in written.items():
        assert redis_client.sismember(keys.desired(node), ckey)
        assert redis_client.hexists(keys.configs, ckey)
    desired = sum(redis_client.scard(keys.desired(n)) for n in NODES)
    assert desired == len(written) == redis_client.hlen(keys.configs)


def test_a_reply_that_does_not_parse_stops_the_write_and_says_how_far_it_got(
    redis_client: redis.Redis, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any error on a part, not only a Redis error (a reply that does not parse), stops
    the write with the parts before it reported as written."""
    monkeypatch.setattr(writer, "PART", 100)
    store = leading(redis_client, service)
    change, assignment = first_placement(1000)
    real = Store.leader_write
    calls: list[int] = []

    def garbled_second_reply(self: Store, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        out = real(self, *args, **kwargs)
        if len(calls) == 2:
            raise ValueError("invalid literal for int() with base 10: b'garbage'")
        return out

    monkeypatch.setattr(Store, "leader_write", garbled_second_reply)
    wrote = writer.write(store, "n0:5", change, assignment, NODES)
    assert isinstance(wrote.error, ValueError) and len(wrote.applied) == 1
    assert wrote.partial and wrote.written == wrote.version > 0


def test_a_leader_whose_write_is_cut_short_carries_on_from_redis(
    redis_url: str, service: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rebalance written in parts whose second part's reply is lost (the part went
    through): the cluster still converges, every config runs exactly once, and Redis's
    assignment and desired sets agree."""
    monkeypatch.setattr(writer, "PART", 6)
    cluster = Cluster(redis_url, service, list(range(30)), settings=FAST)
    keys = Keys(service)
    real = Store.leader_write
    armed = threading.Event()
    calls: list[int] = []

    def lose_a_reply(self: Store, *args: Any, **kwargs: Any) -> Any:
        out = real(self, *args, **kwargs)
        if armed.is_set():
            calls.append(1)
            if len(calls) == 2:
                raise redis.TimeoutError("the reply was lost")
        return out

    try:
        cluster.add(2)
        cluster.wait_balanced()
        monkeypatch.setattr(Store, "leader_write", lose_a_reply)
        armed.set()
        cluster.add(1)
        wait_until(lambda: len(calls) >= 3, 15.0, message="no write after the lost reply")
        cluster.wait_balanced()
        cluster.wait_settled()
        assert cluster.ledger.overlaps() == []
        assignment = {
            k.decode(): v.decode() for k, v in redis_client.hgetall(keys.assignment).items()
        }
        assert len(assignment) == 30
        for manager in cluster.running():
            assert manager.node_id is not None
            mine = {c for c, n in assignment.items() if n == manager.node_id}
            desired = {c.decode() for c in redis_client.smembers(keys.desired(manager.node_id))}
            assert desired == mine
    finally:
        cluster.stop()


@attrs.frozen
class Replanning:
    """A cluster of two managers whose leader has just been made to plan again."""

    cluster: Cluster
    leader: Manager
    held: Optional[bytes]  # the leader value before
    current: Callable[[], Optional[bytes]]  # the leader value now

    def lapsed(self) -> bool:
        """A new epoch (of either node) holds the lead."""
        return self.current() not in (self.held, None)


@contextlib.contextmanager
def replanning(
    redis_url: str, service: str, client: redis.Redis, armed: threading.Event
) -> Iterator[Replanning]:
    """Two managers balanced over four configs; then ``armed`` is set (the next plan is
    slow) and a config is added, so the leader plans again."""
    cluster = Cluster(redis_url, service, list(range(4)), settings=FAST)
    leader_key = Keys(service).leader
    try:
        cluster.add(2)
        cluster.wait_balanced()
        leader = next(m for m in cluster.running() if m.is_leader)
        held = client.get(leader_key)
        armed.set()
        cluster.configs.append(99)
        yield Replanning(cluster, leader, held, lambda: client.get(leader_key))
    finally:
        cluster.stop()


def stall_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "leader_ttl" in r.getMessage()]


def test_a_leader_tick_longer_than_its_lease_says_which_setting_to_raise(
    redis_url: str,
    service: str,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A leader whose tick runs past leader_ttl - heartbeat_interval (a plan of a million
    configs) stops renewing the lead, and says so once, naming the setting to raise; a
    new epoch takes the lead meanwhile."""
    real = plan.plan
    slow = threading.Event()
    release = threading.Event()

    def slow_plan(*args: Any, **kwargs: Any) -> Any:
        if slow.is_set():
            slow.clear()
            release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(plan, "plan", slow_plan)
    with replanning(redis_url, service, redis_client, slow) as run:
        try:
            wait_until(run.lapsed, 10.0)  # the leader plans again, slowly: the lease lapses
        finally:
            release.set()
        warnings = stall_warnings(caplog)
        assert len(warnings) == 1 and str(run.leader.node_id) in warnings[0]
        run.cluster.wait_balanced()
        assert run.cluster.ledger.overlaps() == []


def test_a_load_that_fails_is_read_again_not_planned_from_nothing(
    redis_url: str, service: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new epoch's leader whose read of the stored configs fails reads them again at
    the next tick; it does not plan from an empty copy (which rewrites every config)."""
    real_configs, real_write = Store.configs, Store.leader_write
    fail, failed = threading.Event(), threading.Event()
    writes: list[Change] = []

    def flaky_configs(self: Store) -> Any:
        if fail.is_set():
            fail.clear()
            failed.set()
            raise redis.ConnectionError("the connection dropped")
        return real_configs(self)

    def recorded(self: Store, value: str, change: Change, *args: Any, **kwargs: Any) -> Any:
        if failed.is_set():
            writes.append(change)
        return real_write(self, value, change, *args, **kwargs)

    monkeypatch.setattr(Store, "configs", flaky_configs)
    monkeypatch.setattr(Store, "leader_write", recorded)
    cluster = Cluster(redis_url, service, list(range(5)), settings=FAST)
    leader_key = Keys(service).leader
    try:
        (manager,) = cluster.add(1)
        cluster.wait_balanced()
        held = redis_client.get(leader_key)
        fail.set()
        redis_client.delete(leader_key)  # the lead lapses: the node wins a new epoch
        wait_until(lambda: failed.is_set() and manager.is_leader, 10.0)
        wait_until(lambda: redis_client.get(leader_key) not in (held, None), 10.0)
        cluster.configs.append(5)  # one config more: the next write says only that
        cluster.wait_balanced()
        assert writes and all(set(w.configs) <= {"5"} for w in writes), writes
    finally:
        cluster.stop()


def test_a_write_in_many_slow_parts_keeps_the_lead(
    redis_url: str, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write whose parts take longer together than leader_ttl (a slow network, a
    million configs) is not a stuck leader: the lead is renewed between parts and every
    part lands under one epoch."""
    monkeypatch.setattr(writer, "PART", 6)
    real = Store.leader_write
    slow = threading.Event()  # never set: each part waits out its timeout
    values: list[str] = []
    versions: list[int] = []

    def slow_write(self: Store, value: str, *args: Any, **kwargs: Any) -> Any:
        slow.wait(0.04)  # the network is slow
        values.append(value)
        out = real(self, value, *args, **kwargs)
        versions.append(out[0])
        return out

    monkeypatch.setattr(Store, "leader_write", slow_write)
    # 60 configs of three entries each: 30 parts, 1.2 s of writing, twice leader_ttl
    cluster = Cluster(redis_url, service, list(range(60)), settings=FAST)
    try:
        cluster.add(1)
        cluster.wait_balanced(30)
        assert len(values) >= 30 and len(set(values)) == 1
        assert min(versions) > 0
    finally:
        cluster.stop()


def test_a_new_leader_reading_a_large_placement_keeps_the_lead(
    redis_url: str,
    service: str,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A new epoch's reads of the placement, each slow (a large service), take longer
    together than leader_ttl less heartbeat_interval: the loop shows progress between
    them, so the lead holds and no stall is reported."""
    slow, gate = threading.Event(), threading.Event()  # gate is never set
    loaded = threading.Event()

    def slowed(name: str) -> Any:
        real = getattr(Store, name)

        def read(self: Store) -> Any:
            if slow.is_set():
                gate.wait(0.25)  # a read of a million entries
                if name == "unplaced":
                    loaded.set()
            return real(self)

        return read

    for name in ("assignment", "configs", "unplaced"):
        monkeypatch.setattr(Store, name, slowed(name))
    cluster = Cluster(redis_url, service, list(range(5)), settings=FAST)
    leader_key = Keys(service).leader
    try:
        cluster.add(1)
        cluster.wait_balanced()
        held = redis_client.get(leader_key)
        slow.set()
        redis_client.delete(leader_key)  # the lead lapses: the node wins a new epoch
        wait_until(loaded.is_set, 10.0, message="no new epoch loaded the placement")
        slow.clear()
        epoch = redis_client.get(leader_key)
        assert epoch not in (held, None)
        cluster.configs.append(5)
        cluster.wait_balanced()
        assert redis_client.get(leader_key) == epoch
        assert [r for r in caplog.records if "leader_ttl" in r.getMessage()] == []
    finally:
        cluster.stop()


def busy_plan(
    monkeypatch: pytest.MonkeyPatch, seconds: float, duty: float = 1.0
) -> threading.Event:
    """Make the next plan take ``seconds`` once the returned event is set, computing
    (using the CPU) ``duty`` of that time: 1.0 is a plan of a million configs, a low
    duty a loop mostly stuck."""
    real = plan.plan
    armed = threading.Event()
    idle = threading.Event()  # never set: the waits between bursts

    def slow_plan(*args: Any, **kwargs: Any) -> Any:
        if armed.is_set():
            armed.clear()
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                burst = time.monotonic() + 0.02 * duty
                while time.monotonic() < burst:
                    sum(range(1000))  # computing, not waiting
                if duty < 1.0:
                    idle.wait(0.02 * (1.0 - duty))
        return real(*args, **kwargs)

    monkeypatch.setattr(plan, "plan", slow_plan)
    return armed


def test_a_leader_computing_for_several_leases_keeps_the_lead(
    redis_url: str,
    service: str,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A leader loop that shows no progress for three leases but computes all along (it
    uses the CPU) keeps its lead: one epoch throughout, no stall reported, and its plan
    is written."""
    armed = busy_plan(monkeypatch, 3 * FAST.leader_ttl)
    with replanning(redis_url, service, redis_client, armed) as run:
        # the leader plans again, for three leases
        wait_until(lambda: not armed.is_set(), 10.0, message="the slow plan did not start")
        run.cluster.wait_balanced(20)
        assert run.current() == run.held
        assert stall_warnings(caplog) == []


def test_a_leader_computing_for_too_long_loses_the_lead(
    redis_url: str,
    service: str,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Computing is not a pass for ever: a leader loop without progress for more than
    BUSY_MAX seconds (a plan in an endless loop) loses the lead, and says so."""
    monkeypatch.setattr(node_module, "BUSY_MAX", 1.2)
    armed = busy_plan(monkeypatch, 5 * FAST.leader_ttl)
    with replanning(redis_url, service, redis_client, armed) as run:
        wait_until(run.lapsed, 10.0)
        warnings = stall_warnings(caplog)
        assert len(warnings) == 1 and "computing for over 1.2s" in warnings[0]
        run.cluster.wait_balanced(20)
        assert run.cluster.ledger.overlaps() == []


def test_a_leader_loop_mostly_stuck_loses_the_lead(
    redis_url: str,
    service: str,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A leader loop without progress that uses the CPU only now and then (0.5 % of the
    time: stuck, with bursts) is not computing: it loses the lead within a few leases."""
    armed = busy_plan(monkeypatch, 5 * FAST.leader_ttl, duty=0.005)
    with replanning(redis_url, service, redis_client, armed) as run:
        wait_until(run.lapsed, 10.0)
        run.cluster.wait_balanced(20)
        assert run.cluster.ledger.overlaps() == []
