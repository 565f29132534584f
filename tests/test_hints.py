"""What the pub/sub hints carry, so that a rebalance wakes only the nodes it concerns."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any, Optional

import pytest
import redis

from dim import Manager, __version__
from dim import change as change_set
from dim.change import Change
from dim.keys import Keys
from dim.leader import LeaderLoop
from dim.listener import HintListener
from dim.messages import MAX_MESSAGE_BYTES, Kind, Message, decode
from dim.protocol import ConfigPlace
from dim.reconciler import Reconciler
from dim.store import Store
from dim.testing import wait_until

from .helpers import (
    FAST,
    Cluster,
    HintRecorder,
    id_manager,
    leading,
    no_reset_window,
    slow_heartbeats,
)

# for the tests that count share reads: a loaded machine that stalls a heartbeat for
# half a second must not fence a node (a fence is followed by a whole read)
STEADY = FAST.replace(node_ttl=3.0, leader_ttl=3.0)


@pytest.fixture
def hints(redis_client: redis.Redis, service: str) -> Iterator[HintRecorder]:
    h = HintRecorder(redis_client.pubsub(ignore_subscribe_messages=True), Keys(service).events)
    yield h
    h.close()


def test_releases_are_batched_and_go_to_the_new_owner(
    redis_url: str, service: str, redis_client: redis.Redis, hints: HintRecorder
) -> None:
    """A node stopping its instances at once releases them in fewer hints than
    instances; every hint goes to the inbox of the node the config moved to, and the
    hints name exactly the claims released."""
    gate = threading.Event()
    entered: list[Any] = []
    lock = threading.Lock()

    def disconnect(instance: Any) -> None:
        with lock:
            entered.append(instance)
        gate.wait(10)  # every disconnect returns at the same moment

    def manager(disconnect: Any) -> Manager:
        return Manager(
            get_config=lambda: [{"id": i} for i in range(16)],
            create=lambda config: config["id"],
            disconnect=disconnect,
            redis=redis_url,
            service=service,
            settings=FAST,
        )

    stays, goes = manager(lambda instance: None), manager(disconnect)
    stays.start()
    goes.start()
    stopper = threading.Thread(target=goes.stop)
    try:
        wait_until(
            lambda: len(stays.instances) == 8 == len(goes.instances),
            10,
            message="instances did not start on both",
        )
        assert stays.wait_until_stable(10) and goes.wait_until_stable(10)
        mine = sorted(str(c) for c in goes.instances)
        leaving = goes.node_id
        book = goes._node.reconciler.claims  # type: ignore[union-attr]
        store = goes._node.store  # type: ignore[union-attr]
        release = store.release
        first: list[int] = []

        def in_flight(node_id: str, tokens: dict[str, int], *a: Any) -> Any:
            if not first:
                # the first release is in flight until every other disconnect has
                # returned and queued its claim (on a loaded machine they may not have)
                first.append(len(tokens))
                wait_until(
                    lambda: len(book._releasing) == len(mine) - len(tokens),
                    10,
                    message="the other releases were not queued",
                )
                # a release announces a config to the node the assignment names; when
                # `stays` leads, its plan after our LEFT may not be written yet
                wait_until(
                    lambda: (
                        redis_client.hmget(Keys(service).assignment, mine)
                        == [stays.node_id.encode()] * len(mine)
                    ),
                    10,
                    message="the leader did not move the configs to the node that stays",
                )
            return release(node_id, tokens, *a)

        store.release = in_flight  # type: ignore[method-assign]
        start = hints.mark()
        stopper.start()
        wait_until(lambda: len(entered) == len(mine), 10, message="disconnects did not all start")
        gate.set()
        stopper.join(15)
        assert not stopper.is_alive()

        def releases() -> list[tuple[Optional[str], Message]]:
            # (only the leaving node's: the first placement's moves are not this test's)
            return [(to, m) for to, m in hints.sent(Kind.RELEASED, start) if m.node == leaving]

        wait_until(
            lambda: sum(len(m.ckeys) for _, m in releases()) >= len(mine),
            5,
            message=f"released hints: {hints.sent(Kind.RELEASED, start)}",
        )
        released = releases()
        assert {to for to, _ in released} == {stays.node_id}
        assert sorted(c for _, m in released for c in m.ckeys) == mine
        assert len(released) < len(mine)
        wait_until(lambda: len(stays.instances) == 16, 10, message="the configs did not move")
    finally:
        gate.set()
        if stopper.is_alive():
            stopper.join(15)
        goes.stop()
        stays.stop()


def test_a_release_that_fails_is_sent_again(redis_url: str, service: str) -> None:
    """A release whose round trip fails (a connection reset) is sent again at the next
    tick: the config moves at once, not when its claim lapses a lease later."""
    settings = FAST.replace(heartbeat_interval=0.1, node_ttl=1.2, leader_ttl=1.2)
    cluster = Cluster(redis_url, service, [{"id": 0}, {"id": 1}], settings)
    try:
        (first,) = cluster.add(1)
        cluster.wait_settled()
        store = first._node.store  # type: ignore[union-attr]
        release = store.release
        failed: list[float] = []

        def reset_once(*args: Any, **kwargs: Any) -> Any:
            if not failed:
                failed.append(time.monotonic())
                raise redis.ConnectionError("Connection reset by peer")
            return release(*args, **kwargs)

        store.release = reset_once  # type: ignore[method-assign]
        (second,) = cluster.add(1)
        wait_until(lambda: failed, 10, message="the first node released nothing")
        wait_until(
            lambda: cluster.ledger.create_count(second.node_id) >= 1,
            10,
            message="the config never moved",
        )
        waited = time.monotonic() - failed[0]
        assert waited < settings.lease / 2, f"moved {waited:.2f} s after the failed release"
        assert cluster.ledger.overlaps() == []
    finally:
        cluster.stop()


def test_a_node_that_gives_a_config_away_stops_it_without_a_read(
    redis_url: str, redis_client: redis.Redis, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A join takes a config from a node that does not lead: the delta in its hint says
    where the config went, so the node stops it at once, without reading its share,
    even when its once-a-heartbeat look at configs kept outside its share is due."""
    settings = slow_heartbeats(redis_client, service)
    configs = [{"id": i} for i in range(6)]

    def manager() -> Manager:
        return id_manager(redis_url, service, configs, settings, lambda instance: None)

    lead, gives, joins = manager(), manager(), manager()
    try:
        lead.start()
        wait_until(lambda: len(lead.instances) == 6, 4, message="the first node waited")
        gives.start()
        wait_until(lambda: len(gives.instances) == 3, 4, message="the second node waited")
        assert lead.is_leader and gives.wait_until_stable(4)
        # the look is due (it comes once a heartbeat, 6 s here), and kept due by every
        # tick until a config has moved away: the hint's tick finds it due
        reconciler = gives._node.reconciler  # type: ignore[union-attr]
        looked: list[bool] = []  # per tick: was the look due with a config moved away?
        tick = Reconciler.tick

        def ticked(self: Reconciler) -> float:
            if self is not reconciler:
                return tick(self)
            with self.table.lock:
                away = self.table.slots.keys() - self.table.desired.keys()
            looked.append(bool(away) and self.node.clock() >= self._recheck_at)
            wait = tick(self)
            if not away:
                self._recheck_at = float("-inf")  # (this thread's alone: no lock needed)
            return wait

        monkeypatch.setattr(Reconciler, "tick", ticked)
        reconciler._recheck_at = float("-inf")
        reads = _count_reads([gives])
        joins.start()
        wait_until(
            lambda: [len(m.instances) for m in (lead, gives, joins)] == [2, 2, 2],
            4,
            message="the join did not settle",
        )
        assert any(looked), "no tick looked with a config moved away: nothing was tested"
        assert reads == []
    finally:
        joins.stop()
        gives.stop()
        lead.stop()


def test_a_config_kept_outside_the_share_is_read_for_before_it_is_stopped(
    redis_url: str, redis_client: redis.Redis, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config kept running outside the node's share during a reset window, on a
    placement that says "elsewhere", is not stopped on that placement when the window
    ends: the node reads where the config stands first (Redis still gives it to the
    node, so it runs on)."""
    settings = slow_heartbeats(redis_client, service).replace(heartbeat_interval=0.5)
    stopped: list[Any] = []
    manager = id_manager(redis_url, service, [{"id": 1}, {"id": 2}], settings, stopped.append)
    ticks: list[float] = []
    tick = Reconciler.tick

    def counted(self: Reconciler) -> float:
        wait = tick(self)
        ticks.append(self.node.clock())
        return wait

    monkeypatch.setattr(Reconciler, "tick", counted)
    try:
        manager.start()
        wait_until(lambda: len(manager.instances) == 2, 5, message="nothing was created")
        node = manager._node  # type: ignore[union-attr]
        reconciler = node.reconciler
        wait_until(reconciler.is_stable, 5, message="the node did not settle")
        reads = _count_reads([manager])
        with reconciler.table.lock:
            # what a read in a reset window may leave: a config outside the share, placed
            # elsewhere by stale data, kept while the window lasts
            ckey, config = next(iter(reconciler.table.desired.items()))
            del reconciler.table.desired[ckey]
            reconciler._placements[ckey] = ConfigPlace("elsewhere", config.json)
            node.store.era.reset_until = window_end = node.clock() + 0.3
        reconciler.wake()  # a plan in the window keeps it
        wait_until(
            lambda: len([t for t in ticks if t > window_end]) >= 2,
            5,
            message="the reconciler did not tick after the window",
        )
        assert stopped == [] and len(manager.instances) == 2
        assert reads
    finally:
        manager.stop()


@contextlib.contextmanager
def _kept_outside(
    redis_url: str, redis_client: redis.Redis, service: str
) -> Iterator[tuple[Manager, Manager, list[dict[str, Any]], list[Any], Any, str]]:
    """A leader and a follower of four configs (6 s heartbeats: no look at kept configs
    comes unasked); the follower keeps one of its configs outside its share on a stale
    placement ("elsewhere") through a reset window, which has ended when this yields
    (lead, follows, configs, stopped, kept config id, its ckey). Redis still gives the
    config to the follower: a read brings it back into the share."""
    settings = slow_heartbeats(redis_client, service)
    configs = [{"id": i, "v": 0} for i in range(4)]
    stopped: list[Any] = []
    lead = id_manager(redis_url, service, configs, settings, lambda instance: None)
    follows = id_manager(redis_url, service, configs, settings, stopped.append)
    try:
        lead.start()
        wait_until(lambda: len(lead.instances) == 4, 4, message="the first node waited")
        follows.start()
        wait_until(
            lambda: len(follows.instances) == 2 and len(lead.instances) == 2,
            4,
            message="the second node waited",
        )
        assert lead.is_leader and follows.wait_until_stable(4)
        node = follows._node  # type: ignore[union-attr]
        reconciler = node.reconciler
        kept = min(follows.instances)
        ckey = next(c for c, s in reconciler.table.slots.items() if s.config.id == kept)
        with reconciler.table.lock:
            # what a read in a reset window may leave: a config outside the share, placed
            # elsewhere by stale data, kept while the window lasts
            reconciler._recheck_at = float("inf")  # (the test asks for the look)
            config = reconciler.table.desired.pop(ckey)
            reconciler._placements[ckey] = ConfigPlace("elsewhere", config.json)
            node.store.era.reset_until = window_end = node.clock() + 0.3
        reconciler.wake()  # a plan in the window keeps it
        wait_until(lambda: reconciler.table.slots[ckey].kept, 4, message="not kept")
        wait_until(lambda: node.clock() > window_end, 4)
        yield lead, follows, configs, stopped, kept, ckey
    finally:
        follows.stop()
        lead.stop()


def _change(lead: Manager, configs: list[dict[str, Any]], config_id: Any) -> None:
    configs[:] = [{"id": c["id"], "v": 1} if c["id"] == config_id else c for c in configs]
    lead.refresh()


def test_a_kept_config_is_not_stopped_by_a_tick_that_did_not_read(
    redis_url: str, redis_client: redis.Redis, service: str
) -> None:
    """A config kept outside the share is stopped only on a read of where it stands: a
    tick that a hint woke (its delta changed another config) after the reset window
    ended asks for that read first, and the config runs on."""
    with _kept_outside(redis_url, redis_client, service) as (lead, follows, configs, *rest):
        stopped, kept, _ = rest
        other = max(follows.instances)
        reconciler = follows._node.reconciler  # type: ignore[union-attr]
        before = reconciler._read_version
        _change(lead, configs, other)
        wait_until(lambda: reconciler._read_version != before, 4, message="no hint came")
        assert follows.wait_until_stable(5)
        assert kept in follows.instances and kept not in stopped


def test_a_kept_config_back_in_the_share_is_stopped_by_a_delta_without_a_read(
    redis_url: str, redis_client: redis.Redis, service: str
) -> None:
    """A config kept outside the share that a read brings back into it is no longer
    kept: a delta that then removes it stops it at once, without a read first."""
    with _kept_outside(redis_url, redis_client, service) as (lead, follows, configs, *rest):
        stopped, kept, ckey = rest
        reconciler = follows._node.reconciler  # type: ignore[union-attr]
        reconciler._recheck_at = float("-inf")  # the look is due: a read brings it back
        reconciler.wake()
        wait_until(lambda: ckey in reconciler.table.desired, 4, message="not read back")
        assert follows.wait_until_stable(4)
        reads = _count_reads([follows])
        configs[:] = [c for c in configs if c["id"] != kept]
        lead.refresh()  # removed: the delta says it is gone
        wait_until(lambda: kept in stopped, 4, message="the removed config was not stopped")
        assert reads == []


def test_a_kept_config_is_read_for_again_when_a_hint_overtakes_the_read(
    redis_url: str, redis_client: redis.Redis, service: str
) -> None:
    """The read that asks where a kept config stands may be overtaken by a hint's delta
    (and discarded, as any read the share moved past): the node reads again before it
    decides, and does not stop the config on the placement it held before."""
    with _kept_outside(redis_url, redis_client, service) as (lead, follows, configs, *rest):
        stopped, kept, ckey = rest
        other = max(follows.instances)
        node = follows._node  # type: ignore[union-attr]
        reconciler = node.reconciler
        read = node.store.read_desired
        crossed: list[bool] = []  # the read for the kept config crossed a hint's delta
        asked: list[list[str]] = []

        def crossing_read(node_id: str, handled: list[str], held: Any) -> Any:
            asked.append(list(handled))
            if not crossed and ckey in handled:
                # the write lands and its hint is applied before the read's reply is in
                before = reconciler._read_version
                _change(lead, configs, other)
                wait_until(lambda: reconciler._read_version != before, 4, message="no hint came")
                crossed.append(True)
            return read(node_id, handled, held)

        node.store.read_desired = crossing_read  # type: ignore[method-assign]
        reconciler._recheck_at = float("-inf")  # the look is due
        reconciler.wake()
        wait_until(lambda: crossed, 5, message="no read crossed a hint")
        assert follows.wait_until_stable(5)
        assert kept in follows.instances and kept not in stopped
        assert sum(ckey in handled for handled in asked) >= 2  # read for again


def test_assigned_hint_goes_only_to_the_nodes_it_changes(
    redis_url: str, service: str, hints: HintRecorder
) -> None:
    """A changed config is announced to its owner's inbox alone, with the change itself:
    the owner recreates it without reading its share, and the other nodes hear nothing,
    read nothing and keep their share's version."""
    configs = [{"id": i, "v": 0} for i in range(6)]
    cluster = Cluster(redis_url, service, configs, settings=STEADY)
    try:
        managers = cluster.add(3)
        cluster.wait_settled()
        # a config of a node that does not lead (the leader hears no hint of its own)
        owner = next(m for m in managers if m.instances and not m.is_leader)
        changed = next(iter(owner.instances))
        reads = _count_reads(managers)
        start = hints.mark()
        cluster.configs[changed] = {"id": changed, "v": 1}
        managers[0].refresh()
        wait_until(
            lambda: (
                owner.instances.get(changed) is not None
                and owner.instances[changed].config["v"] == 1
            ),
            10,
            message="the owner did not recreate the changed config",
        )
        # (the recorder reads on a thread of its own: the owner may recreate first)
        wait_until(
            lambda: [to for to, _ in hints.sent(Kind.ASSIGNED, start)] == [owner.node_id],
            10,
            message="the owner's assigned hint was not recorded",
        )
        version = str(hints.sent(Kind.ASSIGNED, start)[0][1].version)
        for m in managers:
            assert m.wait_until_stable(10)
        # only the owner's share has the new version: the others were not woken
        assert owner._node.reconciler.version == version  # type: ignore[union-attr]
        for m in managers:
            if m is not owner:
                assert m._node.reconciler.version != version  # type: ignore[union-attr]
        # ... and nobody read a share, at a hint or at a heartbeat
        now = time.monotonic()
        renewed = [m._node.renewal for m in managers]  # type: ignore[union-attr]
        wait_until(lambda: all(r.last > now + 3 * FAST.heartbeat_interval for r in renewed), 5)
        assert reads == []
        # by now the recorder has every hint of that write: one, to the owner, with the change
        assigned = hints.sent(Kind.ASSIGNED, start)
        assert [to for to, _ in assigned] == [owner.node_id]
        assert assigned[0][1].added == {str(changed): f'[{changed},{{"id":{changed},"v":1}}]'}
        assert cluster.counts() == [2, 2, 2]
        assert cluster.ledger.overlaps() == []
    finally:
        cluster.stop()


def test_config_result_is_taken_when_get_config_returns(
    redis_url: str, redis_client: redis.Redis, service: str
) -> None:
    """The leader plans as soon as get_config returns, not at its next heartbeat: with a
    6 s heartbeat, the first configs and a refreshed one run well within it."""
    # a service this server already knew (a fresh one would wait out a reset window)
    slow = slow_heartbeats(redis_client, service)
    configs = [{"id": 0, "v": 0}, {"id": 1, "v": 0}]
    manager = Manager(
        get_config=lambda: [dict(c) for c in configs],
        create=lambda config: config,
        disconnect=lambda instance: None,
        redis=redis_url,
        service=service,
        settings=slow,
    )
    manager.start()
    try:
        wait_until(lambda: len(manager.instances) == 2, 4, message="the first configs waited")
        configs[0] = {"id": 0, "v": 1}
        manager.refresh()
        wait_until(
            lambda: manager.instances.get(0) is not None and manager.instances[0]["v"] == 1,
            4,
            message="the refreshed config waited for a heartbeat",
        )
    finally:
        manager.stop()


def test_a_share_is_read_as_the_delta_since_the_version_held(
    redis_client: redis.Redis, service: str
) -> None:
    """READ_DESIRED returns only what the last write changed in a node's share when the
    node holds the version that write followed; the whole share otherwise; and an entry
    the assignment contradicts leaves the share, as in a full read."""
    keys = Keys(service)
    store = leading(redis_client, service, "a:5")
    share = [str(i) for i in range(50)]
    first = Change(
        assign={c: "a" for c in share},
        configs={c: f'[{c},{{"id":{c}}}]' for c in share},
        add={"a": share},
    )
    v1, _ = store.leader_write("a:5", first, 5, "a", change_set.deltas(first, first.assign, ["a"]))
    full = store.read_desired("a", [])
    assert full.removed is None and sorted(full.entries) == sorted(share)
    assert full.version == str(v1)

    second = Change(
        assign={"50": "a", "0": "b"},
        configs={"50": '[50,{"id":50}]', "7": '[7,{"id":7,"v":2}]'},
        add={"a": ["50"], "b": ["0"]},
        rem={"a": ["0"]},
    )
    after = {**first.assign, **second.assign}
    v2, _ = store.leader_write("a:5", second, 5, "a", change_set.deltas(second, after, ["a", "b"]))
    delta = store.read_desired("a", [], str(v1))
    assert delta.version == str(v2)
    assert delta.removed == ("0",)
    assert delta.entries == {"50": '[50,{"id":50}]', "7": '[7,{"id":7,"v":2}]'}
    assert delta.placements["0"].node == "b"
    # a node holding another version reads everything
    stale = store.read_desired("a", [], "123")
    assert stale.removed is None and len(stale.entries) == 50

    # a lost write: the assignment says b for a config the delta adds to a
    third = Change(assign={"51": "a"}, configs={"51": '[51,{"id":51}]'}, add={"a": ["51"]})
    v3, _ = store.leader_write("a:5", third, 5, "a", change_set.deltas(third, {"51": "a"}, ["a"]))
    redis_client.hset(keys.assignment, "51", "b")
    contested = store.read_desired("a", [], str(v2))
    assert contested.version == str(v3)
    assert contested.entries == {} and contested.removed == ("51",)
    assert contested.placements["51"].contested


def _reads_of_share(monkeypatch: pytest.MonkeyPatch, after: Any = None) -> list[str]:
    """Record the node of every share read from now on; ``after(node_id, read)`` runs
    once the read came back (and may hold it there)."""
    reads: list[str] = []
    read = Store.read_desired

    def counted(self: Store, node_id: str, *a: Any) -> Any:
        reads.append(node_id)
        share = read(self, node_id, *a)
        if after is not None:
            after(node_id, share)
        return share

    monkeypatch.setattr(Store, "read_desired", counted)
    return reads


def _subscribe_after(monkeypatch: pytest.MonkeyPatch, node_id: str, event: threading.Event) -> None:
    """Node ``node_id``'s listener subscribes only once ``event`` is set."""
    subscribe = HintListener._open

    def subscribing(self: HintListener) -> Any:
        if self.node.node_id == node_id:
            assert event.wait(5)
        return subscribe(self)

    monkeypatch.setattr(HintListener, "_open", subscribing)


def test_a_joining_node_hears_the_answer_to_its_join(
    redis_url: str,
    redis_client: redis.Redis,
    service: str,
    hints: HintRecorder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A node's first read of its share waits for its subscription (here slower than the
    reconciler's start), so the leader's ``assigned`` hint, with the new share inline,
    reaches it if the read came first: it reads its share once (before or after the
    leader's write) and never again."""
    settings = slow_heartbeats(redis_client, service)
    reads = _reads_of_share(monkeypatch)
    reconciling = threading.Event()  # the new node's reconciler has begun its first tick
    tick = Reconciler.tick

    def ticking(self: Reconciler) -> float:
        if self.node.node_id == "new":
            reconciling.set()
        return tick(self)

    monkeypatch.setattr(Reconciler, "tick", ticking)
    _subscribe_after(monkeypatch, "new", reconciling)
    cluster = Cluster(redis_url, service, [{"id": i} for i in range(8)], settings=settings)
    try:
        cluster.add(2)
        cluster.wait_settled(5)
        start = hints.mark()
        (new,) = cluster.add(1, node_name="new")
        cluster.wait_settled(5)  # within a heartbeat
        assert cluster.counts() == [2, 3, 3]
        # the hint went to its inbox, with its share (the recorder reads on a thread of
        # its own: wait for it)
        wait_until(
            lambda: [to for to, m in hints.sent(Kind.ASSIGNED, start) if m.added] == [new.node_id],
            5,
            message=f"assigned hints with a share: {hints.sent(Kind.ASSIGNED, start)}",
        )
        assert reads.count(new.node_id) == 1
        assert cluster.ledger.overlaps() == []
    finally:
        cluster.stop()


def test_a_join_during_the_leaders_own_start_is_heard(
    redis_url: str, redis_client: redis.Redis, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first node leads from its first heartbeat; its leader loop reads the
    membership before its listener has subscribed, and a second node joins in that gap
    (its ``joined`` hint reaches nobody). Once subscribed, the listener wakes the leader:
    the join is seen at once, not at the next heartbeat."""
    settings = slow_heartbeats(redis_client, service)
    first_tick = threading.Event()
    joined = threading.Event()
    tick = LeaderLoop.tick

    def ticking(self: LeaderLoop) -> float:
        wait = tick(self)
        if self.node.node_id == "L" and self.node.is_leader:
            first_tick.set()
        return wait

    monkeypatch.setattr(LeaderLoop, "tick", ticking)
    _subscribe_after(monkeypatch, "L", joined)
    cluster = Cluster(redis_url, service, [{"id": i} for i in range(8)], settings=settings)
    try:
        cluster.add(1, node_name="L")
        assert first_tick.wait(5)
        cluster.add(1, node_name="Y")
        joined.set()
        cluster.wait_settled(3)  # within a heartbeat (6 s)
        assert cluster.counts() == [4, 4]
    finally:
        cluster.stop()


def test_a_hint_that_crosses_a_read_is_applied_once_the_read_is_in(
    redis_url: str, redis_client: redis.Redis, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The leader's answer to a join arrives while the new node's first read, sent
    before the write, is still on its way back: the node applies the hint's delta to
    what the read brought, with no second read and no heartbeat."""
    settings = slow_heartbeats(redis_client, service)
    joining: dict[str, str] = {}
    first_read = threading.Event()  # the new node's first read has run in Redis
    hint_in = threading.Event()  # ... and the leader's hint has reached the new node

    def hold(node_id: str, share: Any) -> None:
        if node_id == joining.get("id") and not first_read.is_set():
            assert share.version is None  # before the leader's write
            first_read.set()
            assert hint_in.wait(10), "the leader's hint never reached the new node"

    reads = _reads_of_share(monkeypatch, after=hold)
    write = Store.leader_write

    def write_after_the_read(self: Store, *a: Any, **kw: Any) -> Any:
        if "id" in joining:
            assert first_read.wait(10)
        return write(self, *a, **kw)

    monkeypatch.setattr(Store, "leader_write", write_after_the_read)
    assigned = Reconciler.assigned

    def heard(self: Reconciler, *a: Any, **kw: Any) -> None:
        assigned(self, *a, **kw)
        if self.node.node_id == joining.get("id"):
            hint_in.set()

    monkeypatch.setattr(Reconciler, "assigned", heard)
    cluster = Cluster(redis_url, service, [{"id": i} for i in range(8)], settings=settings)
    try:
        cluster.add(2)
        cluster.wait_settled(5)
        new = cluster.make(node_name="joining")
        joining["id"] = "joining"
        new.start()
        cluster.managers.append(new)
        cluster.wait_settled(5)  # within a heartbeat
        assert cluster.counts() == [2, 3, 3]
        assert reads.count("joining") == 1
        assert cluster.ledger.overlaps() == []
    finally:
        cluster.stop()


def test_a_successor_never_applies_its_predecessors_old_share(
    redis_url: str,
    redis_client: redis.Redis,
    service: str,
    hints: HintRecorder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The leader placed a static node's predecessor with a hint (no share before: ``p``
    0, the share inline). The predecessor is dropped and one of its configs removed; its
    successor joins and reads no share, and then that old hint reaches it late (held up
    on the way): it must not take it for the answer to its own join, which would claim
    and create the removed config."""
    keys = Keys(service)
    no_reset_window(redis_client, keys)
    joined = threading.Event()  # the successor's first read is in
    old_heard = threading.Event()  # ... then it has heard the predecessor's old hint
    ticked = threading.Event()  # ... and its reconciler has acted on it
    versions: dict[str, int] = {}

    handle = HintListener.handle

    def handling(self: HintListener, data: Any) -> Any:
        message = handle(self, data)
        if self.node.node_id == "s" and message and message.version == versions.get("old"):
            old_heard.set()
        return message

    read = Store.read_desired

    def reading(self: Store, node_id: str, *a: Any) -> Any:
        got = read(self, node_id, *a)
        if node_id == "s":
            joined.set()
        return got

    tick = Reconciler.tick

    def ticking(self: Reconciler) -> float:
        heard = old_heard.is_set()
        wait = tick(self)
        if self.node.node_id == "s" and heard:
            ticked.set()
        return wait

    write = Store.leader_write

    def answering(self: Store, *a: Any, **kw: Any) -> Any:
        deltas = a[4] if len(a) > 4 else kw["deltas"]
        if "s" in deltas and "old" in versions:
            assert ticked.wait(10)  # the answer to the successor's join comes late
        reply = write(self, *a, **kw)
        if "s" in deltas:
            versions.setdefault("old", reply[0])
        return reply

    claimed: list[str] = []
    claim = Store.claim

    def claiming(self: Store, node_id: str, ckeys: list[str], *a: Any, **kw: Any) -> Any:
        if node_id == "s":
            claimed.extend(ckeys)
        return claim(self, node_id, ckeys, *a, **kw)

    for cls, name, fn in [
        (HintListener, "handle", handling),
        (Store, "read_desired", reading),
        (Reconciler, "tick", ticking),
        (Store, "leader_write", answering),
        (Store, "claim", claiming),
    ]:
        monkeypatch.setattr(cls, name, fn)

    cluster = Cluster(redis_url, service, [{"id": i} for i in range(6)], settings=STEADY)
    fake = Store(redis.Redis.from_url(redis_url), service)
    crashed = threading.Event()
    info = {"host": "h", "pid": "1", "started": "0", "weight": "1.0", "version": __version__}
    info.update(session="old", static="1", tags="", capacity="")

    def predecessor() -> None:  # heartbeats as "s", claims nothing
        while not crashed.is_set():
            fake.heartbeat(
                "s",
                node_ttl=0.6,
                leader_ttl=0.6,
                leaving=False,
                may_lead=False,
                renew_leader="",
                info=info,
                claims={},
                joined=Message(Kind.JOINED, "s"),
                session="old",
                health="0 0",
            )
            crashed.wait(0.05)

    beats = threading.Thread(target=predecessor, daemon=True)
    successor = cluster.make(node_name="s")
    try:
        (a,) = cluster.add(1, node_name="a")
        cluster.wait_settled(5)
        start = hints.mark()
        beats.start()
        wait_until(lambda: len(a.instances) == 3, 5)  # the leader placed the predecessor

        def to_s() -> list[Message]:
            return [m for to, m in hints.sent(Kind.ASSIGNED, start) if to == "s"]

        # (the recorder hears it on its own thread: on a loaded machine, after a moved)
        wait_until(to_s, 5, message="no assigned hint went to the predecessor")
        (old,) = to_s()
        assert old.previous == 0 and old.added
        theirs = {int(c) for c in redis_client.smembers(keys.desired("s"))}
        crashed.set()
        beats.join()
        wait_until(lambda: len(a.instances) == 6, 5)  # the predecessor is dropped
        gone = min(theirs)
        cluster.configs = [c for c in cluster.configs if c["id"] != gone]
        a.refresh()
        wait_until(lambda: len(a.instances) == 5, 5)
        successor.start()
        cluster.managers.append(successor)
        assert joined.wait(10)
        wait_until(lambda: successor._node is not None and successor._node.subscribed.is_set(), 5)
        late = {"k": "assigned", "n": old.node, "e": old.epoch, "v": old.version, "p": 0}
        late.update(a=old.added, r=old.moved)  # as the leader's script wrote it
        redis_client.publish(keys.inbox("s"), json.dumps(late))  # the old hint, late
        cluster.wait_settled(5)
        assert ticked.is_set()
        assert str(gone) not in claimed
        assert gone not in cluster.placement()
        assert cluster.ledger.overlaps() == []
    finally:
        crashed.set()
        cluster.stop()
        fake.client.close()


def test_a_start_survives_a_failed_subscription(
    redis_url: str, redis_client: redis.Redis, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When subscribing fails, even with an error that is not a RedisError (a cluster
    moving a slot), the node starts, and its listener subscribes again and hears the
    hints."""
    from redis.client import PubSub
    from redis.exceptions import SlotNotCoveredError

    calls: list[str] = []
    execute = PubSub.execute_command

    def flaky(self: PubSub, *args: Any) -> Any:
        calls.append(str(args[0]))
        if len(calls) == 1:
            raise SlotNotCoveredError('Slot "1" not covered by the cluster.')
        return execute(self, *args)

    monkeypatch.setattr(PubSub, "execute_command", flaky)
    settings = slow_heartbeats(redis_client, service)
    cluster = Cluster(redis_url, service, [{"id": i} for i in range(4)], settings=settings)
    try:
        cluster.add(1)
        cluster.wait_settled(5)
        assert len(calls) >= 2  # the listener subscribed after all
        cluster.add(1)
        cluster.wait_settled(5)  # within a heartbeat: the first node heard the join
        assert cluster.counts() == [2, 2]
    finally:
        cluster.stop()


def test_a_graceful_move_waits_for_no_heartbeat(
    redis_url: str, redis_client: redis.Redis, service: str
) -> None:
    """With a 6 s heartbeat, a join, two added configs and a graceful leave each settle
    well within one heartbeat: every step is woken by a hint (a node's share change
    arrives in the hint itself, and what it adds is claimed at once)."""
    slow = slow_heartbeats(redis_client, service)

    configs = [{"id": i} for i in range(8)]

    def manager() -> Manager:
        return Manager(
            get_config=lambda: list(configs),
            create=lambda config: config["id"],
            disconnect=lambda instance: None,
            redis=redis_url,
            service=service,
            settings=slow,
        )

    first = manager()
    first.start()
    second = manager()
    try:
        wait_until(lambda: len(first.instances) == 8, 4, message="the first node waited")
        second.start()
        wait_until(
            lambda: len(first.instances) == 4 and len(second.instances) == 4,
            4,
            message="the join waited for a heartbeat",
        )
        # two new configs: one each, the follower's in its hint
        configs.extend([{"id": 8}, {"id": 9}])
        first.refresh()
        wait_until(
            lambda: len(first.instances) == 5 and len(second.instances) == 5,
            4,
            message="the added configs waited for a heartbeat",
        )
        moving = second if first.is_leader else first
        stays = first if moving is second else second
        moving.stop()
        wait_until(lambda: len(stays.instances) == 10, 4, message="the leave waited")
    finally:
        second.stop()
        first.stop()


@contextlib.contextmanager
def _one_leaves(
    redis_url: str, service: str, settings: Any, gate: threading.Event
) -> Iterator[Any]:
    """Three nodes with six configs, two each: ``lead`` leads, ``stays`` does not, and
    ``goes`` disconnects only once ``gate`` is set; ``stopper`` is a thread (not started)
    that stops ``goes``. Yields (configs, lead, stays, goes, stopper); stops them all."""
    configs = [{"id": i} for i in range(6)]
    # only the gate ends a disconnect: one let go at its deadline would be released
    # (and announced) whether the leader and ``stays`` had got that far or not
    settings = settings.replace(disconnect_timeout=10.0)

    def manager(disconnect: Any) -> Manager:
        return id_manager(redis_url, service, configs, settings, disconnect)

    lead = manager(lambda instance: None)
    lead.start()
    stays, goes = manager(lambda instance: None), manager(lambda instance: gate.wait(10))
    stopper = threading.Thread(target=goes.stop)
    try:
        wait_until(lambda: len(lead.instances) == 6, 4, message="the first node waited")
        stays.start()
        goes.start()
        wait_until(
            lambda: [len(m.instances) for m in (lead, stays, goes)] == [2, 2, 2],
            4,
            message="the joins did not settle",
        )
        assert lead.is_leader and not stays.is_leader
        yield configs, lead, stays, goes, stopper
    finally:
        gate.set()
        if stopper.is_alive():
            stopper.join(15)
        goes.stop()
        stays.stop()
        lead.stop()


def test_a_config_still_held_elsewhere_is_claimed_once_it_is_released(
    redis_url: str, redis_client: redis.Redis, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node given a config that the node leaving still runs does not try to claim it
    while it is held: the leader's hint says so, and the release's hint wakes the one
    claim that takes it (no failed claim first; a 6 s heartbeat, so no retry helps)."""
    slow = slow_heartbeats(redis_client, service)
    gate = threading.Event()
    with _one_leaves(redis_url, service, slow, gate) as (_, _, stays, goes, stopper):
        held = {str(c) for c in goes.instances}
        claims: list[list[str]] = []
        claim = Store.claim

        def counted(self: Store, node_id: str, ckeys: list[str], *a: Any) -> Any:
            if node_id == stays.node_id:
                claims.append([c for c in ckeys if c in held])
            return claim(self, node_id, ckeys, *a)

        monkeypatch.setattr(Store, "claim", counted)
        planned = threading.Event()
        tick = Reconciler.tick

        def ticked(self: Reconciler) -> float:
            wait = tick(self)
            # a tick that found its share grown by a config the leaving node holds
            if self.node.node_id == stays.node_id and held & set(self.table.slots):
                planned.set()
            return wait

        monkeypatch.setattr(Reconciler, "tick", ticked)
        stopper.start()
        assert planned.wait(4), "the node staying was not given a config of the one leaving"
        gate.set()  # the disconnects return, the claims are released
        wait_until(lambda: len(stays.instances) == 3, 4, message="the release was not heard")
        assert [c for c in claims if c] == [[c] for c in held & set(map(str, stays.instances))]


def test_a_release_heard_before_the_claim_is_planned_is_not_lost(
    redis_url: str, redis_client: redis.Redis, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The release of a config still held at the leader's write may be heard before the
    reconciler plans its claim: the claim then goes out at once, not at a heartbeat."""
    slow = slow_heartbeats(redis_client, service)
    gate, heard = threading.Event(), threading.Event()
    with _one_leaves(redis_url, service, slow, gate) as (_, _, stays, _, stopper):
        reconciler = stays._node.reconciler  # type: ignore[union-attr]
        tick, released = Reconciler.tick, Reconciler.released

        def held_tick(self: Reconciler) -> float:
            if self is reconciler and self._held:
                gate.set()  # the delta is in, its claims not planned: release them now
                assert heard.wait(5)
            return tick(self)

        def released_hint(self: Reconciler, ckeys: tuple[str, ...]) -> None:
            released(self, ckeys)
            if self is reconciler:
                heard.set()

        monkeypatch.setattr(Reconciler, "tick", held_tick)
        monkeypatch.setattr(Reconciler, "released", released_hint)
        stopper.start()
        wait_until(lambda: len(stays.instances) == 3, 4, message="the release was lost")
        assert heard.is_set()


def test_a_read_at_the_version_held_returns_only_where_configs_stand(
    redis_client: redis.Redis, service: str
) -> None:
    """A node holding the current share version that asks where some configs stand
    gets their placements and no share at all (no cost that grows with the share)."""
    store = leading(redis_client, service, "a:5")
    share = [str(i) for i in range(20)]
    change = Change(
        assign={**{c: "a" for c in share}, "x": "b"},
        configs={c: f'["{c}",{{}}]' for c in [*share, "x"]},
        add={"a": share, "b": ["x"]},
    )
    v1, _ = store.leader_write(
        "a:5", change, 5, "a", change_set.deltas(change, change.assign, ["a"])
    )
    read = store.read_desired("a", ["x"], str(v1))
    assert read.version == str(v1)
    assert read.entries == {} and read.removed == ()
    assert read.placements["x"].node == "b"


def test_an_assigned_hint_names_what_another_node_holds_and_stays_small(
    redis_client: redis.Redis, service: str
) -> None:
    """The leader's hint names the configs it adds to a node's share that another
    node's claim holds at the write (not those free, nor the node's own), and a delta
    that would leave no room for those names is not sent inline: no hint outgrows the
    size every node accepts."""
    keys = Keys(service)
    store = leading(redis_client, service, "a:5")
    inbox = redis_client.pubsub(ignore_subscribe_messages=True)
    inbox.subscribe(f"{keys.events}:a")
    limit = MAX_MESSAGE_BYTES - 120 - len(json.dumps("a"))  # as the leader computes it

    def write(configs: dict[str, str]) -> bytes:
        change = Change(assign={c: "a" for c in configs}, configs=configs, add={"a": list(configs)})
        deltas = change_set.deltas(change, change.assign, ["a"], configs, limit)
        store.leader_write("a:5", change, 5, "a", deltas)
        got = inbox.get_message(timeout=5)
        while got is None or got["type"] != "message":
            got = inbox.get_message(timeout=5)
        return got["data"]

    try:
        redis_client.set(keys.claim("1"), "b:7")
        redis_client.set(keys.claim("2"), "a:3")  # its own (an earlier incarnation)
        raw = write({c: f'["{c}",{{}}]' for c in ("1", "2", "3")})
        hint = decode(raw)
        assert hint.added is not None and sorted(hint.added) == ["1", "2", "3"]
        assert hint.ckeys == ("1",)
        # ten configs, all held by b, whose delta alone just fits the limit
        held = [f"held-config-{i}" for i in range(10)]
        for c in held:
            redis_client.set(keys.claim(c), "b:7")

        def padded(n: int) -> dict[str, str]:
            return {c: json.dumps([c, {"p": "x" * n}]) for c in held}

        def inline(n: int) -> int:
            configs = padded(n)
            text = ',"a":' + json.dumps(configs, separators=(",", ":")) + ',"r":{}'
            return len(text)

        pad = max(n for n in range(100) if inline(n) <= limit)
        raw = write(padded(pad))
        assert len(raw) <= MAX_MESSAGE_BYTES
        hint = decode(raw)
        assert hint.added is None  # no room to name them: the node reads
    finally:
        inbox.close()


def test_named_configs_fit_the_hint_however_the_script_escapes_them(
    redis_client: redis.Redis, service: str
) -> None:
    """The leader-write script's JSON writes each ``/`` of a config key as ``\\/``: an
    inline delta whose named configs have many keeps the hint within the size every
    node accepts (with versions and epoch of production size)."""
    keys = Keys(service)
    epoch = no_reset_window(redis_client, keys)  # a real epoch is a fence value
    redis_client.set(keys.leader, f"a:{epoch}")
    redis_client.hset(keys.shares, "a", epoch + 1)  # the share version before: a fence value
    store = Store(redis_client, service)
    inbox = redis_client.pubsub(ignore_subscribe_messages=True)
    inbox.subscribe(f"{keys.events}:a")
    limit = MAX_MESSAGE_BYTES - 120 - len(json.dumps("a"))  # as the leader computes it
    held = [f"s3://b/{i}/x" for i in range(10)]  # 40 slashes in all
    for c in held:
        redis_client.set(keys.claim(c), "b:7")

    def padded(n: int) -> dict[str, str]:
        return {c: json.dumps([c, {"p": "x" * (n if c == held[0] else 0)}]) for c in held}

    def change_of(configs: dict[str, str]) -> Change:
        return Change(assign={c: "a" for c in configs}, configs=configs, add={"a": held})

    def inline(configs: dict[str, str]) -> bool:
        change = change_of(configs)
        return "h" in change_set.deltas(change, change.assign, ["a"], configs, limit)["a"]

    configs = padded(max(n for n in range(1000) if inline(padded(n))))
    change = change_of(configs)
    try:
        deltas = change_set.deltas(change, change.assign, ["a"], configs, limit)
        store.leader_write(f"a:{epoch}", change, epoch, "a", deltas)
        got = inbox.get_message(timeout=5)
        while got is None or got["type"] != "message":
            got = inbox.get_message(timeout=5)
        raw = got["data"]
        assert len(raw) <= MAX_MESSAGE_BYTES
        assert decode(raw).ckeys == tuple(held)
    finally:
        inbox.close()


def test_a_config_removed_then_given_back_free_is_claimed_at_once(
    redis_url: str, redis_client: redis.Redis, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config named as held elsewhere, then removed, released and given back free
    before the node planned its claim, is claimed at once: the first hint's word is
    not kept past the later ones (a 6 s heartbeat, so no retry helps)."""
    slow = slow_heartbeats(redis_client, service)
    keys = Keys(service)
    gate, resume, blocked = threading.Event(), threading.Event(), threading.Event()
    with _one_leaves(redis_url, service, slow, gate) as (configs, lead, stays, _, stopper):
        reconciler = stays._node.reconciler  # type: ignore[union-attr]
        tick = Reconciler.tick

        def busy_tick(self: Reconciler) -> float:
            # the reconciler is busy elsewhere while three writes land
            if self is reconciler and self._held and not resume.is_set():
                blocked.set()
                assert resume.wait(10)
            return tick(self)

        monkeypatch.setattr(Reconciler, "tick", busy_tick)
        stopper.start()
        try:
            assert blocked.wait(4), "no config was named as held"
            x = sorted(reconciler._held)[0]
            configs[:] = [c for c in configs if str(c["id"]) != x]
            lead.refresh()  # removed: no assignee
            wait_until(lambda: x not in reconciler.table.desired, 4, message="not removed")
            gate.set()  # released, and announced to nobody
            wait_until(lambda: not redis_client.exists(keys.claim(x)), 4, message="not released")
            configs.append({"id": int(x)})
            lead.refresh()  # given back, free
            wait_until(lambda: x in reconciler.table.desired, 4, message="not given back")
        finally:
            resume.set()
        wait_until(lambda: int(x) in stays.instances, 3, message=f"{x} waited for a heartbeat")


def _count_reads(managers: list[Manager]) -> list[str]:
    """Record the node of every read of a share from now on."""
    reads: list[str] = []
    for m in managers:
        store = m._node.store  # type: ignore[union-attr]
        read = store.read_desired

        def counted(*a: Any, _read: Any = read, _id: str = m.node_id) -> Any:
            reads.append(_id)
            return _read(*a)

        store.read_desired = counted  # type: ignore[method-assign]
    return reads


def _change_a_config_of(cluster: Cluster, owner: Manager, managers: list[Manager]) -> Any:
    changed = next(iter(owner.instances))
    cluster.configs[changed] = {"id": changed, "v": 1}
    managers[0].refresh()
    return changed


def _recreated(owner: Manager, changed: Any) -> bool:
    instance = owner.instances.get(changed)
    return instance is not None and instance.config["v"] == 1


def test_a_heartbeat_ahead_of_the_hint_waits_for_it(
    redis_url: str, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A heartbeat that finds the new share version before the write's hint has arrived
    does not make the node read its share: the hint, with its delta, follows at once."""
    monkeypatch.setattr("dim.reconciler.HINT_WAIT", 5.0)  # a hint never waited out here
    cluster = Cluster(redis_url, service, [{"id": i, "v": 0} for i in range(6)], settings=STEADY)
    try:
        managers = cluster.add(3)
        cluster.wait_settled()
        owner = next(m for m in managers if m.instances and not m.is_leader)
        node = owner._node  # type: ignore[union-attr]
        reconciler = node.reconciler
        before = reconciler.version
        listener = node.listener
        deliver = listener.handle

        def late(data: Any) -> Any:
            # the hint waits until a heartbeat has reported the version it brings
            if decode(data).kind is Kind.ASSIGNED:
                wait_until(lambda: reconciler.version != before, 10, message="no heartbeat")
            return deliver(data)

        listener.handle = late  # type: ignore[method-assign]
        reads = _count_reads([owner])
        changed = _change_a_config_of(cluster, owner, managers)
        wait_until(lambda: _recreated(owner, changed), 10, message="not recreated")
        assert owner.wait_until_stable(10)
        assert reads == []
    finally:
        cluster.stop()


def test_a_heartbeat_older_than_the_hint_does_not_set_the_node_back(
    redis_url: str, service: str
) -> None:
    """A heartbeat that ran in Redis before a write, but whose reply is handled after the
    write's hint, reports the version before it: the node neither goes back to that
    version nor reads its share."""
    cluster = Cluster(redis_url, service, [{"id": i, "v": 0} for i in range(6)], settings=STEADY)
    try:
        managers = cluster.add(3)
        cluster.wait_settled()
        owner = next(m for m in managers if m.instances and not m.is_leader)
        node = owner._node  # type: ignore[union-attr]
        reconciler = node.reconciler
        before = reconciler.version
        beat = node.store.heartbeat
        hold = threading.Event()
        held = threading.Event()

        def slow_reply(*a: Any, **kw: Any) -> Any:
            result = beat(*a, **kw)
            if hold.is_set() and not held.is_set():
                # this heartbeat ran before the write: hand its reply over after the hint
                held.set()
                wait_until(lambda: reconciler.version != before, 10, message="no hint")
            return result

        node.store.heartbeat = slow_reply  # type: ignore[method-assign]
        hold.set()
        assert held.wait(5)
        reads = _count_reads([owner])
        changed = _change_a_config_of(cluster, owner, managers)
        wait_until(lambda: _recreated(owner, changed), 10, message="not recreated")
        renewal = node.renewal
        now = time.monotonic()
        wait_until(lambda: renewal.last > now + 3 * FAST.heartbeat_interval, 5)
        assert reconciler.version != before
        assert owner.wait_until_stable(10)
        assert reads == []
    finally:
        cluster.stop()


def test_a_lost_hint_is_read_for_while_writes_keep_coming(
    redis_url: str, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node whose hints are lost reads its share a moment after its heartbeat first
    finds a version no hint brought, even while each heartbeat finds a newer one."""
    monkeypatch.setattr("dim.reconciler.HINT_WAIT", 0.2)  # four heartbeats
    cluster = Cluster(redis_url, service, [{"id": i, "v": 0} for i in range(6)], settings=STEADY)
    try:
        managers = cluster.add(3)
        cluster.wait_settled()
        owner = next(m for m in managers if m.instances and not m.is_leader)
        listener = owner._node.listener  # type: ignore[union-attr]
        deliver = listener.handle
        listener.handle = lambda data: (  # type: ignore[method-assign]
            None if decode(data).kind is Kind.ASSIGNED else deliver(data)
        )
        reads = _count_reads([owner])
        changed = next(iter(owner.instances))
        deadline = time.monotonic() + 5
        v = 0
        while not reads and time.monotonic() < deadline:
            # a new share version at about every heartbeat of the owner
            v += 1
            cluster.configs[changed] = {"id": changed, "v": v}
            managers[0].refresh()
            owner._node.stop_event.wait(0.04)  # type: ignore[union-attr]
        assert reads, f"no read in 5 s of {v} changes"
    finally:
        cluster.stop()


def test_a_read_that_crossed_a_write_is_followed_by_another(redis_url: str, service: str) -> None:
    """A read that ran in Redis before a write, answered after the heartbeat found the
    write's version, does not count as holding that version: with the hint lost and no
    heartbeat after, the node reads again a moment later, not a heartbeat later."""
    # heartbeats may stop a while; a heartbeat is longer than the wait below
    settings = FAST.replace(heartbeat_interval=1.0, node_ttl=10.0, leader_ttl=10.0)
    cluster = Cluster(redis_url, service, [{"id": i, "v": 0} for i in range(6)], settings=settings)
    try:
        managers = cluster.add(3)
        cluster.wait_settled()
        owner = next(m for m in managers if m.instances and not m.is_leader)
        node = owner._node  # type: ignore[union-attr]
        reconciler = node.reconciler
        listener = node.listener
        deliver = listener.handle
        listener.handle = lambda data: (  # type: ignore[method-assign]
            None if decode(data).kind is Kind.ASSIGNED else deliver(data)
        )
        before = reconciler.version
        read = node.store.read_desired
        reads: list[Any] = []
        crossed = threading.Event()

        def slow_read(*a: Any) -> Any:
            result = read(*a)
            reads.append(result.version)
            if len(reads) == 1:
                # this read ran before the write: answer once a heartbeat found it
                crossed.set()
                wait_until(lambda: reconciler.version != before, 10, message="no heartbeat")
                hold.set()
            return result

        node.store.read_desired = slow_read  # type: ignore[method-assign]
        beat = node.store.heartbeat
        hold, resume = threading.Event(), threading.Event()

        def held_beat(*a: Any, **kw: Any) -> Any:
            if hold.is_set():
                resume.wait(3)  # no heartbeat after the one that found the write
            return beat(*a, **kw)

        node.store.heartbeat = held_beat  # type: ignore[method-assign]
        reconciler.wake(read=True)
        assert crossed.wait(5)
        changed = next(iter(owner.instances))
        cluster.configs[changed] = {"id": changed, "v": 1}
        managers[0].refresh()
        try:
            assert hold.wait(5)  # a heartbeat found the write; none follows
            # (within the held heartbeat's 3 s: the read comes from the hint's timer)
            wait_until(lambda: len(reads) >= 2, 2.0, message="no read after the crossed one")
        finally:
            resume.set()
        assert reads[0] == before and reads[1] != before
        wait_until(lambda: _recreated(owner, changed), 10, message="not recreated")
    finally:
        cluster.stop()
