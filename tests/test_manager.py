"""Managers in one process against a real redis-server: spread, moves, handoff, events."""

from __future__ import annotations

import logging
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any, Optional

import pytest
import redis

from dim import EventType, Manager, StateError
from dim.keys import Keys
from dim.manager import _HURRIED_PASSES
from dim.testing import wait_until

from .helpers import FAST, Cluster, id_manager, slow_heartbeats


@pytest.fixture
def cluster(redis_url: str, service: str):
    c = Cluster(redis_url, service, [{"id": i, "url": f"wss://{i}"} for i in range(12)])
    yield c
    c.stop()


def test_even_spread(cluster: Cluster) -> None:
    """12 configs over 3 nodes run exactly once each, 4 per node."""
    cluster.add(3)
    cluster.wait_balanced()
    assert cluster.counts() == [4, 4, 4]
    assert cluster.ledger.overlaps() == []


def test_uneven_spread_differs_by_at_most_one(cluster: Cluster) -> None:
    """12 configs over 5 nodes: counts differ by at most one."""
    cluster.add(5)
    cluster.wait_balanced()
    counts = cluster.counts()
    assert sum(counts) == 12 and max(counts) - min(counts) <= 1


def test_join_moves_only_the_minimum(cluster: Cluster) -> None:
    """A third node joining takes exactly its fair share (4) and nothing else moves."""
    cluster.add(2)
    cluster.wait_balanced()
    before = cluster.ledger.create_count()
    (new,) = cluster.add(1)
    cluster.wait_settled()
    assert cluster.ledger.create_count() - before == 4
    assert cluster.ledger.create_count(new.node_id) == 4
    assert cluster.counts() == [4, 4, 4]
    assert cluster.ledger.overlaps() == []


def test_graceful_leave_moves_only_its_instances(cluster: Cluster) -> None:
    """A node leaving gracefully: only its 4 configs are recreated elsewhere."""
    cluster.add(3)
    cluster.wait_balanced()
    before = cluster.ledger.create_count()
    leaving = cluster.managers[1]
    leaving.stop()
    cluster.wait_settled()
    assert cluster.ledger.create_count() - before == 4
    assert cluster.counts() == [6, 6]
    assert cluster.ledger.overlaps() == []


def test_leader_leave_hands_over(cluster: Cluster) -> None:
    """Stopping the leader elects another node at once and keeps every config running."""
    cluster.add(3)
    cluster.wait_settled()
    leader = next(m for m in cluster.managers if m.is_leader)
    leader.stop()
    wait_until(lambda: any(m.is_leader for m in cluster.running()), 5)
    cluster.wait_settled()
    assert cluster.counts() == [6, 6]
    assert cluster.ledger.overlaps() == []


def test_no_overlap_during_churn(cluster: Cluster) -> None:
    """Nodes joining and leaving repeatedly never run one config in two places at once."""
    cluster.add(2)
    cluster.wait_settled()
    for round_ in range(4):
        cluster.add(1)
        cluster.wait_settled()
        cluster.running()[round_ % 2].stop()
        cluster.wait_settled()
    assert cluster.ledger.overlaps() == []


def test_config_add_remove_and_change(cluster: Cluster) -> None:
    """Added configs start, removed ones stop, a changed one is recreated with new content."""
    cluster.add(2)
    cluster.wait_settled()
    cluster.configs = [c for c in cluster.configs if c["id"] != 0] + [{"id": "new"}]
    cluster.configs[0] = {"id": 1, "url": "wss://changed"}
    for m in cluster.running():
        m.refresh()

    def instances() -> dict[Any, Any]:
        return {k: v for m in cluster.running() for k, v in m.instances.items()}

    def recreated() -> bool:
        # one read: the instance may go between two (it is stopped, then created again)
        instance = instances().get(1)
        return instance is not None and instance.config["url"] == "wss://changed"

    wait_until(recreated, 10, message="changed config not recreated")
    cluster.wait_settled()
    assert 0 not in instances() and "new" in instances()
    assert instances()[1].config["url"] == "wss://changed"
    assert cluster.ledger.overlaps() == []


def test_stop_leaves_only_history(redis_url: str, service: str, redis_client: redis.Redis) -> None:
    """After every node stops, no member, claim, desired set or leader key remains."""
    cluster = Cluster(redis_url, service, list(range(6)))
    cluster.add(3)
    cluster.wait_settled()
    cluster.stop()
    keys = sorted(k.decode() for k in redis_client.keys(Keys(service).prefix + "*"))
    prefix = Keys(service).prefix
    assert [k[len(prefix) :] for k in keys] == ["configs", "era", "fence", "left", "version"]
    # every instance that was ever created was disconnected
    entries = cluster.ledger.intervals()
    assert entries and all(iv.end is not None for iv in entries)


def test_fencing_tokens_grow_across_owners(cluster: Cluster) -> None:
    """A config's lease token is larger after each move to a new owner."""
    (a,) = cluster.add(1)
    cluster.wait_settled()
    first = a.lease(3)
    assert first is not None and first.node_id == a.node_id
    (b,) = cluster.add(1)
    a.stop()
    cluster.wait_settled()
    second = b.lease(3)
    assert second is not None and second.token > first.token


def test_lease_visible_inside_create(redis_url: str, service: str) -> None:
    """create() can read the lease (and token) of the instance it is building."""
    seen: dict[Any, Any] = {}
    box: dict[str, Manager] = {}

    def create(config: Any) -> object:
        seen[config] = box["m"].lease(config)
        return object()

    manager = Manager(lambda: [1, 2], create, redis=redis_url, service=service, settings=FAST)
    box["m"] = manager
    with manager:
        assert manager.wait_until_stable(10)
        assert set(seen) == {1, 2}
        assert all(lease is not None and lease.token > 0 for lease in seen.values())
        assert manager.leases[1] == seen[1]


def test_events_reach_listeners(redis_url: str, service: str) -> None:
    """Listeners hear leadership, creation and rebalance; a raising listener is harmless."""
    events: list[Any] = []
    manager = Manager(
        lambda: [1], lambda c: object(), redis=redis_url, service=service, settings=FAST
    )
    manager.add_listener(events.append)
    manager.add_listener(lambda e: 1 / 0, EventType.INSTANCE_CREATED)
    with manager:
        assert manager.wait_until_stable(10)
        wait_until(lambda: EventType.INSTANCE_CREATED in {e.type for e in events}, 5)
    types = {e.type for e in events}
    assert {
        EventType.LEADERSHIP_GAINED,
        EventType.REBALANCE_APPLIED,
        EventType.INSTANCE_DISCONNECTED,
    } <= types


def test_listeners_added_and_removed_while_running(redis_url: str, service: str) -> None:
    """An event nobody listens to is dropped, yet a listener added later hears what
    follows, one removed hears nothing more, and a restart keeps the listeners."""
    configs = [1]
    heard: list[Any] = []

    def created(event: Any) -> None:
        heard.append(event.config_id)

    manager = Manager(
        lambda: list(configs), lambda c: object(), redis=redis_url, service=service, settings=FAST
    )
    with manager:
        assert manager.wait_until_stable(10)
        manager.add_listener(created, EventType.INSTANCE_CREATED)
        configs.append(2)
        manager.refresh()
        wait_until(lambda: heard == [2], 5)
        manager.remove_listener(created)
        manager.add_listener(created, EventType.INSTANCE_DISCONNECTED)
        configs.remove(1)
        manager.refresh()
        wait_until(lambda: heard == [2, 1], 5)
        configs.append(3)
        manager.refresh()
        wait_until(lambda: set(manager.instances) == {2, 3}, 5)
    # the disconnects of the stop, heard on the last dispatcher before it ended
    assert sorted(heard[2:]) == [2, 3]
    heard.clear()
    with manager:
        assert manager.wait_until_stable(10)
    assert sorted(heard) == [2, 3]  # the restarted node's stop, heard by the kept listener


def test_a_graceful_stop_lets_an_overrunning_disconnect_go_at_its_deadline(
    redis_url: str, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """stop() starts every disconnect at once: those that return release their claims at
    once, one that overruns ``disconnect_timeout`` is reported and its claim let go then
    (the config moves while it still runs), and its late return changes nothing (each
    instance is reported disconnected once)."""
    caplog.set_level(logging.DEBUG, logger="dim.events")
    # (a deadline a second past the wait for the others: a loaded machine may take a
    # second to move them, and the hung one must still be running then)
    settings = FAST.replace(disconnect_timeout=3.0)
    gate = threading.Event()
    hung: list[Any] = []
    configs = [{"id": i} for i in range(4)]

    def manager(disconnect: Any) -> Manager:
        return id_manager(redis_url, service, configs, settings, disconnect)

    goes = manager(lambda instance: gate.wait(10) if instance in hung else None)
    goes.start()
    stays = manager(lambda instance: None)
    heard: list[Any] = []
    goes.add_listener(heard.append, EventType.DISCONNECT_TIMEOUT)
    stopper = threading.Thread(target=goes.stop)
    node = goes.node_id
    try:
        wait_until(lambda: len(goes.instances) == 4, 10, message="the first node waited")
        stays.start()
        wait_until(lambda: len(stays.instances) == 2, 10, message="the join did not settle")
        hung.append(min(goes.instances))
        others = set(goes.instances) - set(hung)
        stopper.start()
        wait_until(lambda: others <= set(stays.instances), 2, message="not released at once")
        assert hung[0] not in stays.instances  # still running on the node that stops
        wait_until(lambda: set(stays.instances) == {0, 1, 2, 3}, 10, message="never let go")
        assert not gate.is_set()  # it moved while its disconnect still ran
        stopper.join(settings.stop_timeout + 2)
        assert not stopper.is_alive()
        assert [e.config_id for e in heard] == hung
    finally:
        gate.set()
        stopper.join(15)
        stays.stop()
    reported = Counter(
        r.getMessage().split("config=")[1].split(" ")[0]
        for r in caplog.records
        if r.getMessage().startswith(f"event instance_disconnected node={node} ")
    )
    assert reported == Counter({"0": 1, "1": 1, "2": 1, "3": 1})


def test_status_shows_the_cluster(cluster: Cluster) -> None:
    """status() names the leader, every node, and where each config is assigned and runs."""
    cluster.add(2)
    cluster.wait_settled()
    status = cluster.managers[0].status()
    assert status.leader in {m.node_id for m in cluster.managers}
    assert {n.node_id for n in status.nodes} == {m.node_id for m in cluster.managers}
    assert len(status.configs) == 12 and status.pending == [] and status.not_running == []
    assert sum(n.running for n in status.nodes) == 12
    data = status.to_dict()
    assert data["service"] == cluster.service and len(data["configs"]) == 12


def test_restart_gets_a_new_node_id(redis_url: str, service: str) -> None:
    """start() after stop() joins again as a new node and runs the configs again."""
    manager = Manager(
        lambda: [1], lambda c: object(), redis=redis_url, service=service, settings=FAST
    )
    manager.start()
    first = manager.node_id
    assert manager.start() is manager  # idempotent while running
    assert manager.wait_until_stable(10)
    manager.stop()
    manager.stop()  # safe twice
    assert manager.node_id is None and manager.instances == {}
    with pytest.raises(StateError):
        manager.wait_until_stable(1)
    manager.start()
    try:
        assert manager.node_id != first
        assert manager.wait_until_stable(10) and list(manager.instances) == [1]
    finally:
        manager.stop()


def test_no_thread_left_after_stop(redis_url: str, service: str) -> None:
    """stop() ends every dim thread of the node."""
    manager = Manager(
        lambda: [1, 2], lambda c: object(), redis=redis_url, service=service, settings=FAST
    ).start()
    node_id = manager.node_id
    assert manager.wait_until_stable(10)
    assert any(node_id in t.name for t in threading.enumerate())
    manager.stop()
    wait_until(
        lambda: not [t for t in threading.enumerate() if node_id in t.name and t.is_alive()], 5
    )


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork() with threads (3.12+)
def test_fork_after_start_is_detected(redis_url: str, service: str) -> None:
    """A started manager inherited through fork() refuses to work in the child, saying
    why, and the parent's node is unaffected."""
    import os

    from dim import ForkedError

    manager = Manager(
        lambda: [1], lambda c: object(), redis=redis_url, service=service, settings=FAST
    ).start()
    try:
        assert manager.wait_until_stable(10)
        pid = os.fork()
        if pid == 0:  # the child: report through the exit code only
            code = 3
            try:
                manager.instances  # noqa: B018
            except ForkedError as exc:
                code = 0 if "post_fork" in str(exc) else 4
            except BaseException:
                code = 5
            manager.stop()  # a no-op in the child: it must not touch the parent's claims
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert manager.wait_until_stable(5) and list(manager.instances) == [1]
    finally:
        manager.stop()


# -- a stop() interrupted by a signal --------------------------------------------------
# A service's signal handler may raise SystemExit in the main thread while stop() runs
# there (a second SIGTERM, a second Ctrl-C). The node must still leave: a node left
# behind as a member that claims nothing holds configs that then run nowhere, and its
# threads run on for as long as the process lives.


@pytest.fixture
def interrupt():
    """Installs a handler that raises SystemExit, like a service's; returns a function
    that delivers its signal to the main thread (where stop() runs) from any thread."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(f"signal {signum}")

    previous = signal.signal(signal.SIGUSR1, handler)
    main = threading.main_thread().ident
    assert main is not None and threading.current_thread() is threading.main_thread()
    yield lambda: signal.pthread_kill(main, signal.SIGUSR1)
    signal.signal(signal.SIGUSR1, previous)


def _loop_threads(node_id: str) -> list[str]:
    roles = ("heartbeat", "fence", "reconciler", "leader", "listener", "health", "events")
    names = {f"dim-{role}-{node_id}" for role in roles}
    return [t.name for t in threading.enumerate() if t.is_alive() and t.name in names]


def _handed_over(cluster: Cluster, redis_client: redis.Redis, node_id: Any) -> None:
    """The node left at once (not by TTL), its loops ended, and the other node of the
    cluster runs all 12 configs, none of them ever in two places."""
    assert redis_client.zscore(Keys(cluster.service).nodes, node_id) is None
    wait_until(lambda: not _loop_threads(node_id), 5, message="its loops run on")
    cluster.wait_settled()
    assert cluster.counts() == [12]
    assert cluster.ledger.overlaps() == []


def test_a_stop_interrupted_before_the_node_left_still_leaves(
    cluster: Cluster, interrupt: Any, redis_client: redis.Redis, monkeypatch: Any
) -> None:
    """The signal lands while the leader makes its final rebalance (before it announced
    that it leaves): stop() raises it, and the node has left all the same; every config
    runs once on the other node and the stopped node's threads end."""
    first = cluster.add()[0]
    wait_until(lambda: first.is_leader, 10, message="the first node never led")
    cluster.add()
    cluster.wait_balanced()
    node_id = first.node_id
    assert node_id is not None
    leader = first._parts[1]  # type: ignore[index]
    rebalance = leader.final_rebalance

    def interrupted() -> None:
        interrupt()  # the handler runs at once, here, on the main thread
        rebalance()

    monkeypatch.setattr(leader, "final_rebalance", interrupted)
    with pytest.raises(SystemExit):
        first.stop()
    _handed_over(cluster, redis_client, node_id)


def test_a_stop_interrupted_while_it_waits_for_disconnects_ends_the_node(
    redis_url: str, service: str, redis_client: redis.Redis, interrupt: Any
) -> None:
    """The signal lands while stop() starts or waits for slow disconnects: it raises it, the
    node's loops end at once all the same (none renews or claims any more), and its
    disconnects still finish and hand their configs over, each once."""
    release = threading.Event()
    disconnecting: list[Any] = []
    stopping: dict[str, str] = {}

    once = threading.Lock()

    def disconnect(node: str, instance: Any) -> None:
        if node == stopping.get("node"):
            if once.acquire(blocking=False):  # (never released: one signal only)
                interrupt()  # from this stop thread to the main thread, in stop()
            disconnecting.append(instance.config)
            release.wait(30)

    cluster = Cluster(
        redis_url,
        service,
        list(range(6)),
        settings=FAST.replace(disconnect_timeout=3.0),
        disconnect=disconnect,
    )
    try:
        first, _second = cluster.add(2)
        cluster.wait_balanced()
        node_id = first.node_id
        assert node_id is not None
        stopping["node"] = node_id
        held = sorted(first.instances)
        with pytest.raises(SystemExit):
            first.stop()
        assert not release.is_set() and disconnecting
        assert redis_client.zscore(Keys(service).nodes, node_id) is None
        wait_until(lambda: not _loop_threads(node_id), 5, message="its loops run on")
        release.set()
        cluster.wait_settled()
        assert cluster.counts() == [6]
        assert sorted(disconnecting) == held
        assert all(iv.end is not None for iv in cluster.ledger.intervals() if iv.node == node_id)
        assert cluster.ledger.overlaps() == []
        wait_until(
            lambda: not [t for t in threading.enumerate() if node_id in t.name],
            5,
            message="a thread of the stopped node is left",
        )
    finally:
        release.set()
        cluster.stop()


class Gated:
    """A cluster whose disconnects on one node wait for a gate, counted per instance."""

    def __init__(self, redis_url: str, service: str, n: int, **kwargs: Any) -> None:
        self.gate = threading.Event()
        self.calls: Counter[int] = Counter()
        self.node: Optional[str] = None
        self.running = 0
        self.cluster = Cluster(
            redis_url, service, list(range(n)), disconnect=self._disconnect, **kwargs
        )

    def _disconnect(self, node: str, instance: Any) -> None:
        if node == self.node:
            self.calls[id(instance)] += 1
            self.gate.wait(30)

    def watch(self, manager: Manager) -> None:
        """Gate and count the disconnects of this manager's instances from now on."""
        self.node, self.running = manager.node_id, len(manager.instances)

    def stopped_cleanly(self) -> None:
        """Every instance of the node was disconnected exactly once, and no config ran
        in two places (the other node started each only after its disconnect)."""
        self.gate.set()

        def ours() -> list[Any]:
            return [iv for iv in self.cluster.ledger.intervals() if iv.node == self.node]

        wait_until(lambda: all(iv.end is not None for iv in ours()), 5, message="one runs on")
        assert len(self.calls) == self.running and set(self.calls.values()) == {1}
        self.cluster.wait_settled()
        assert self.cluster.ledger.overlaps() == []


@pytest.fixture
def gated(redis_url: str, service: str) -> Iterator[Gated]:
    g = Gated(redis_url, service, 12)
    yield g
    g.gate.set()
    g.cluster.stop()


def test_a_stop_interrupted_between_two_disconnects_still_starts_them_all(
    gated: Gated, interrupt: Any, monkeypatch: Any
) -> None:
    """The signal lands after stop() started the first disconnect and before the next:
    every instance of the node is still disconnected, none twice, and only then does
    another node start its config (no claim lapses under an instance nobody stops)."""
    first, _second = gated.cluster.add(2)
    gated.cluster.wait_balanced()
    gated.watch(first)
    assert gated.running == 6
    lifecycle = first._parts[0].lifecycle  # type: ignore[index]
    spawn = lifecycle.spawn_stop
    started: list[Any] = []

    def interrupted(slot: Any, *args: Any, **kwargs: Any) -> None:
        spawn(slot, *args, **kwargs)
        started.append(slot.config.id)
        if len(started) == 1:
            interrupt()  # the handler runs at once, here, on the main thread

    monkeypatch.setattr(lifecycle, "spawn_stop", interrupted)
    with pytest.raises(SystemExit):
        first.stop()
    gated.stopped_cleanly()
    assert gated.cluster.counts() == [12]


def test_a_stop_interrupted_between_two_last_disconnects_still_starts_them_all(
    gated: Gated, interrupt: Any, monkeypatch: Any
) -> None:
    """At its thread limit until stop()'s deadline, the node starts its disconnects once
    more at the deadline; the signal lands between two of those: every instance is still
    disconnected, none twice, before another node starts its config."""
    first, _second = gated.cluster.add(2)
    gated.cluster.wait_balanced()
    gated.watch(first)
    lifecycle = first._parts[0].lifecycle  # type: ignore[index]
    runners, start = lifecycle._threads, lifecycle._threads.start
    # (and no tick retries them before the deadline: each would run its stop itself)
    monkeypatch.setattr(lifecycle, "retry_stops", lambda: None)

    def limited(fn: Any, arg: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("name") == lifecycle._stop_name and not lifecycle._final:
            raise RuntimeError("can't start new thread")  # until the deadline
        return start(fn, arg, *args, **kwargs)

    monkeypatch.setattr(runners, "start", limited)
    spawn = lifecycle.spawn_stop
    last: list[Any] = []

    def interrupted(slot: Any, *args: Any, **kwargs: Any) -> None:
        spawn(slot, *args, **kwargs)
        if lifecycle._final and threading.current_thread() is threading.main_thread():
            last.append(slot.config.id)
            if len(last) == 1:  # (the next pass starts the rest: on the main thread too)
                interrupt()

    monkeypatch.setattr(lifecycle, "spawn_stop", interrupted)
    with pytest.raises(SystemExit):
        first.stop(timeout=0.3)
    assert last, "the thread limit did not hold until the deadline"
    gated.stopped_cleanly()


@pytest.mark.parametrize("again", [1, _HURRIED_PASSES], ids=["once-more", "every-pass"])
def test_a_stop_interrupted_again_while_it_finishes_still_leaves(
    cluster: Cluster,
    interrupt: Any,
    redis_client: redis.Redis,
    monkeypatch: Any,
    again: int,
) -> None:
    """Signals keep coming (a user pressing Ctrl-C over and over): the first lands in
    the final rebalance, the next ones as stop() runs the rest of the leave. After one
    more, the next pass still leaves; when every pass is cut short, stop() raises, the
    manager stays started, and the next stop() leaves."""
    first = cluster.add()[0]
    wait_until(lambda: first.is_leader, 10, message="the first node never led")
    cluster.add()
    cluster.wait_balanced()
    node_id = first.node_id
    reconciler, leader = first._parts  # type: ignore[misc]
    rebalance, begin_close = leader.final_rebalance, reconciler.begin_close
    passes: list[int] = []

    def interrupted() -> None:
        interrupt()
        rebalance()

    def closing() -> None:
        passes.append(1)
        if 1 < len(passes) <= 1 + again:  # each pass after the first begins here
            interrupt()
        begin_close()

    monkeypatch.setattr(leader, "final_rebalance", interrupted)
    monkeypatch.setattr(reconciler, "begin_close", closing)
    with pytest.raises(SystemExit):
        first.stop()
    if again == _HURRIED_PASSES:
        assert first.node_id == node_id, "the manager forgot a node that did not leave"
        monkeypatch.undo()  # (no more signals)
        first.stop()
    assert first.node_id is None
    _handed_over(cluster, redis_client, node_id)


@pytest.mark.parametrize(
    "error",
    [RuntimeError("can't start new thread"), SystemExit("a signal")],
    ids=["out-of-threads", "interrupted"],
)
def test_a_start_that_cannot_start_its_threads_leaves_again(
    redis_url: str,
    service: str,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    error: BaseException,
) -> None:
    """start() joined with its first heartbeat, then could not start every loop (the
    process is at its thread limit, or a signal handler raised): it raises, the node is
    no member (it would be assigned configs and run none), no thread of it is left, and
    the manager starts cleanly afterwards."""
    start = threading.Thread.start
    node_ids: list[str] = []

    def failing(thread: threading.Thread) -> None:
        if thread.name.startswith("dim-reconciler-"):
            node_ids.append(thread.name[len("dim-reconciler-") :])
            raise error
        start(thread)

    manager = Manager(lambda: [1, 2], lambda c: c, redis=redis_url, service=service, settings=FAST)
    monkeypatch.setattr(threading.Thread, "start", failing)
    with pytest.raises(type(error)):
        manager.start()
    monkeypatch.undo()
    try:
        assert manager.node_id is None and len(node_ids) == 1
        assert redis_client.zscore(Keys(service).nodes, node_ids[0]) is None
        wait_until(
            lambda: not [t for t in threading.enumerate() if node_ids[0] in t.name],
            5,
            message="a thread of the node that failed to start is left",
        )
        manager.start()
        assert manager.wait_until_stable(10) and sorted(manager.instances) == [1, 2]
    finally:
        manager.stop()


def test_a_release_cut_short_by_a_signal_is_sent_by_the_next_flush(
    redis_url: str, service: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A signal handler that raises in a release (stop()'s flush, on the main thread)
    does not lose it: the claim is queued again, and the next pass's flush lets it go
    (else the config would wait out a lease, running nowhere)."""
    manager = Manager(lambda: [1], lambda c: c, redis=redis_url, service=service, settings=FAST)
    manager.start()
    try:
        assert manager.wait_until_stable(10)
        book = manager._parts[0].claims  # type: ignore[index]
        lease = manager.lease(1)
        assert lease is not None and redis_client.exists(Keys(service).claim("1"))
        release = book._store.release

        def interrupted(*args: Any) -> None:
            monkeypatch.setattr(book._store, "release", release)
            raise SystemExit("a signal")

        monkeypatch.setattr(book._store, "release", interrupted)
        with pytest.raises(SystemExit):
            book.release({"1": lease.token})
        book.flush()  # (or the reconciler's tick did, first)
        assert not book.queued and not redis_client.exists(Keys(service).claim("1"))
    finally:
        manager.stop()


def test_a_signal_handler_that_stops_the_manager_itself_cuts_a_stop_short(
    cluster: Cluster, redis_client: redis.Redis, monkeypatch: Any
) -> None:
    """A handler that calls stop() and then exits (a common SIGTERM handler) lands in a
    stop() under way: the handler's stop() leaves, and the stop() it cut short lets its
    SystemExit go on (not an error of its own)."""
    first = cluster.add()[0]
    wait_until(lambda: first.is_leader, 10, message="the first node never led")
    cluster.add()
    cluster.wait_balanced()
    node_id = first.node_id
    leader = first._parts[1]  # type: ignore[index]
    rebalance = leader.final_rebalance
    main = threading.main_thread().ident
    assert main is not None

    def handler(signum: int, frame: Any) -> None:
        first.stop()
        raise SystemExit(0)

    def interrupted() -> None:
        signal.pthread_kill(main, signal.SIGUSR1)  # the handler runs at once, here
        rebalance()

    monkeypatch.setattr(leader, "final_rebalance", interrupted)
    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        with pytest.raises(SystemExit):
            first.stop()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert first.node_id is None
    _handed_over(cluster, redis_client, node_id)


# -- a claim's lease once its create returned --------------------------------------------


def test_a_claim_lives_a_lease_once_its_create_returned_not_until_the_next_heartbeat(
    redis_url: str, redis_client: redis.Redis, service: str
) -> None:
    """A claim is taken for ``create_lease`` (its create may be slow); once ``create``
    returns, its TTL is cut to a ``lease`` at once, not at the next heartbeat, so a node
    killed right after a create costs its configs a lease, not a create lease."""
    settings = slow_heartbeats(redis_client, service).replace(create_timeout=30.0)
    assert settings.create_lease > 2 * settings.lease
    created = threading.Event()

    def create(config: dict[str, Any]) -> Any:
        created.set()
        return config["id"]

    manager = Manager(
        lambda: [{"id": 1}], create, redis=redis_url, service=service, settings=settings
    )
    claim = Keys(service).claim("1")
    try:
        manager.start()
        assert created.wait(5)
        wait_until(lambda: manager.instances == {1: 1}, 5)
        # (well within the heartbeat: the next one is six seconds away)
        wait_until(
            lambda: 0 < redis_client.pttl(claim) <= settings.lease * 1000,
            1.0,
            message=f"the claim still lives {redis_client.pttl(claim)} ms "
            f"(lease {settings.lease * 1000:.0f} ms, create lease "
            f"{settings.create_lease * 1000:.0f} ms)",
        )
        assert redis_client.get(claim).startswith(manager.node_id.encode())
    finally:
        manager.stop()
