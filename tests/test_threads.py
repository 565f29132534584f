"""Threads under pressure (issue #10, from a review of the fence and the health loop):
a healthcheck that hangs for good, a process that cannot start threads for a moment, a
log handler that blocks, and ``stop()`` while a healthcheck hangs.

Each test states the behaviour it proves on a real Redis; none of them looks at dim's
internals beyond thread names (``dim-<role>-<node id>``).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable, Optional

import pytest
import redis

from dim import Event, EventType, Manager
from dim.keys import Keys
from dim.listener import HintListener
from dim.node import Node
from dim.testing import RedisServer, wait_until
from dim.usercode import Runners

from .helpers import FAST, Cluster, Quiet, comes_true


def _threads(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.is_alive() and t.name.startswith(prefix)]


def _events(manager: Manager, *types: EventType) -> list[Event]:
    seen: list[Event] = []
    manager.add_listener(seen.append, *types)
    return seen


def _holds(check: Callable[[], Optional[str]], seconds: float, what: str) -> None:
    """Fail if ``check`` reports a problem (a string) at any sample during ``seconds``."""
    found: dict[str, str] = {}

    def over() -> bool:
        problem = check()
        if problem:
            found["problem"] = problem
            return True
        return False

    try:
        wait_until(over, seconds, interval=0.02)
    except TimeoutError:
        pass  # held for the whole time
    assert not found, f"{what}: {found.get('problem')}"


# -- a healthcheck that hangs for good ---------------------------------------------------


def _checked_manager(
    redis_url: str,
    service: str,
    create: Callable[[Any], Any],
    healthcheck: Callable[[Any], Any],
) -> tuple[Manager, list[Event]]:
    """A started manager of configs 0 and 1, checked every 50 ms with a 100 ms timeout,
    and the INSTANCE_UNHEALTHY events it emits."""
    settings = FAST.replace(healthcheck_interval=0.05, healthcheck_timeout=0.1)
    manager = Manager(
        lambda: [0, 1],
        create,
        healthcheck=healthcheck,
        redis=redis_url,
        service=service,
        settings=settings,
    )
    unhealthy = _events(manager, EventType.INSTANCE_UNHEALTHY)
    manager.start()
    return manager, unhealthy


def test_hung_healthcheck_costs_one_thread_per_config(redis_url: str, service: str) -> None:
    """A healthcheck that never returns for one config marks that instance unhealthy once
    (it is recreated); while the check hangs, that config's later instances are not
    checked, so the hang costs one thread, not one per round. The other config is checked
    all along, and once the hung check returns the config is checked again."""
    release = threading.Event()
    gens = itertools.count(1)
    checks: dict[int, int] = {}
    lock = threading.Lock()

    def create(config: Any) -> dict[str, int]:
        return {"config": config, "gen": next(gens)}

    def healthcheck(instance: dict[str, int]) -> bool:
        with lock:
            checks[instance["gen"]] = checks.get(instance["gen"], 0) + 1
        if instance["config"] == 0:
            release.wait(60)
        return True

    manager, unhealthy = _checked_manager(redis_url, service, create, healthcheck)
    try:
        node = manager.node_id
        assert node is not None
        prefix = f"dim-healthcheck-{node}"
        wait_until(lambda: unhealthy, 10, message="the hung check never timed out")
        assert {e.config_id for e in unhealthy} == {0}
        wait_until(lambda: manager.instances.get(0, {}).get("gen", 0) > 1, 10)
        one = manager.instances[1]["gen"]
        base = checks.get(one, 0)

        def leaks() -> Optional[str]:
            hung = [t for t in _threads(prefix) if t.is_alive()]
            if len(hung) > 2:  # the hung one, plus at most one check of config 1 running
                return f"{len(hung)} healthcheck threads alive"
            return None

        _holds(leaks, 1.5, "a hung healthcheck leaked threads")
        assert checks.get(one, 0) >= base + 5, f"config 1 was not checked on: {checks}"
        assert len([e for e in unhealthy if e.config_id == 0]) == 1, unhealthy
        release.set()
        current = manager.instances[0]["gen"]
        wait_until(
            lambda: checks.get(current, 0) >= 1,
            10,
            message=f"config 0 was not checked again after the hang ended: {checks}",
        )
    finally:
        release.set()
        manager.stop()


def test_hung_healthcheck_of_a_shared_object_recreates_once(redis_url: str, service: str) -> None:
    """``create`` may return the same object every time (a shared client): a check that
    hangs on it still marks the config unhealthy once, not at every round."""
    release = threading.Event()
    shared = {0: {"config": 0}, 1: {"config": 1}}
    created: list[Any] = []

    def create(config: Any) -> dict[str, int]:
        created.append(config)
        return shared[config]

    def healthcheck(instance: dict[str, int]) -> bool:
        if instance["config"] == 0:
            release.wait(60)
        return True

    manager, unhealthy = _checked_manager(redis_url, service, create, healthcheck)
    try:
        wait_until(lambda: unhealthy, 10, message="the hung check never timed out")
        wait_until(lambda: created.count(0) >= 2, 10, message="config 0 was not recreated")

        def recreated() -> Optional[str]:
            if len(unhealthy) > 1 or created.count(0) > 2:
                return f"{len(unhealthy)} unhealthy events, {created.count(0)} creates of 0"
            return None

        _holds(recreated, 1.5, "a hung check on a shared object recreated the config again")
    finally:
        release.set()
        manager.stop()


# -- a process that cannot start threads for a moment ------------------------------------


class ThreadLimit:
    """While ``failing`` is set, starting a thread whose name starts with ``prefix`` fails
    the way it does in a process at its thread limit (RuntimeError: can't start new
    thread), and a call for such a thread finds no idle one in its pool (they are all
    busy: a stop may otherwise take a thread a create left idle)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.failing = threading.Event()
        self.refused = 0
        # called with the count before a refusal: a thread start that is slow to fail
        self.stall: Callable[[int], object] = lambda refused: None

    def set(self) -> None:
        self.failing.set()

    def clear(self) -> None:
        self.failing.clear()


def _thread_limit(monkeypatch: pytest.MonkeyPatch, prefix: str) -> Iterator[ThreadLimit]:
    limit = ThreadLimit(prefix)
    original = threading.Thread.start

    def start(self: threading.Thread) -> None:
        if limit.failing.is_set() and self.name.startswith(limit.prefix):
            limit.refused += 1
            limit.stall(limit.refused)
            raise RuntimeError("can't start new thread")
        original(self)

    reuse = Runners._reuse

    def no_idle_thread(self: Runners, kind: str, borrow: bool) -> Any:
        if limit.failing.is_set() and kind.startswith(limit.prefix):
            return None
        return reuse(self, kind, borrow)

    monkeypatch.setattr(threading.Thread, "start", start)
    monkeypatch.setattr(Runners, "_reuse", no_idle_thread)
    try:
        yield limit
    finally:
        limit.clear()


@pytest.fixture
def no_stop_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[ThreadLimit]:
    yield from _thread_limit(monkeypatch, "dim-stop-")


@pytest.fixture
def no_worker_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[ThreadLimit]:
    yield from _thread_limit(monkeypatch, "dim-worker-")


def test_a_create_that_could_not_start_is_retried(
    redis_url: str, service: str, no_worker_threads: ThreadLimit
) -> None:
    """A config claimed while no worker thread can be started (the node's first create:
    its pool has no thread yet) is created once threads can be started again, once."""
    cluster = Cluster(redis_url, service, [])
    try:
        (manager,) = cluster.add(1)
        assert manager.wait_until_stable(10)
        no_worker_threads.set()
        cluster.configs = [{"id": 0}]
        manager.refresh()
        wait_until(lambda: no_worker_threads.refused >= 1, 15, message="no create was tried")
        no_worker_threads.clear()
        cluster.wait_settled(timeout=10)
        assert set(manager.instances) == {0}
        assert cluster.ledger.create_count() == 1
    finally:
        no_worker_threads.clear()
        cluster.stop()


def test_every_create_of_a_batch_is_tried_when_one_cannot_start(
    redis_url: str, service: str, no_worker_threads: ThreadLimit
) -> None:
    """When the worker thread for one config of a claimed batch cannot be started, the
    others of the batch are still tried at once (not a create_lease later, when their
    unknown claims would have expired)."""
    cluster = Cluster(redis_url, service, [])
    try:
        (manager,) = cluster.add(1)
        assert manager.wait_until_stable(10)
        no_worker_threads.set()
        cluster.configs = [{"id": i} for i in range(3)]
        manager.refresh()
        wait_until(lambda: no_worker_threads.refused >= 1, 15, message="no create was tried")
        # every tick tries each of them again (a heartbeat: 50 ms); before, the batch
        # was dropped at the first failure and its claims waited out their TTL (2.35 s)
        wait_until(
            lambda: no_worker_threads.refused >= 3,
            FAST.create_lease / 2,
            message="the rest of the batch was not tried",
        )
        no_worker_threads.clear()
        cluster.wait_settled(timeout=10)
        assert cluster.ledger.create_count() == 3
    finally:
        no_worker_threads.clear()
        cluster.stop()


def test_a_stop_that_could_not_start_is_retried(
    redis_url: str, service: str, no_stop_threads: ThreadLimit
) -> None:
    """Configs removed while no thread can be started are disconnected once threads can
    be started again; the node's loops survive."""
    cluster = Cluster(redis_url, service, [{"id": i} for i in range(3)])
    try:
        (manager,) = cluster.add(1)
        cluster.wait_settled()
        no_stop_threads.set()
        cluster.configs = [{"id": 0}]
        # the removal reaches the node while it cannot start the disconnects
        wait_until(lambda: no_stop_threads.refused >= 1, 10, message="no stop was tried")
        no_stop_threads.clear()
        cluster.wait_settled(timeout=10)
        assert set(manager.instances) == {0}
        assert cluster.ledger.overlaps() == []
        for role in ("heartbeat", "fence", "reconciler", "leader"):
            assert _threads(f"dim-{role}-{manager.node_id}"), f"the {role} thread died"
    finally:
        no_stop_threads.clear()
        cluster.stop()


@pytest.fixture
def no_call_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[ThreadLimit]:
    yield from _thread_limit(monkeypatch, "dim-call-")


@pytest.fixture
def no_watchdog(monkeypatch: pytest.MonkeyPatch) -> Iterator[ThreadLimit]:
    """The thread that times creates and disconnects cannot be started (a worker runs its
    create and a stop thread its disconnect itself). The watchdog starts with a node's
    first create: set it before the node starts (its creates then run on call threads,
    each with its timeout), and count the refusals from where the test begins."""
    yield from _thread_limit(monkeypatch, "dim-watch-")


def _released_while_running(
    cluster: Cluster, client: redis.Redis, node: Optional[str]
) -> Callable[[], Optional[str]]:
    """A check for :func:`_holds`: an instance of ``node`` runs while its claim is not
    held by ``node``."""
    keys = Keys(cluster.service)

    def check() -> Optional[str]:
        for iv in cluster.ledger.intervals():
            if iv.end is None and iv.node == node:
                owner = client.get(keys.claim(str(iv.cid)))
                if owner is None or not owner.decode().startswith(f"{iv.node}:"):
                    return f"config {iv.cid} runs on {iv.node}, its claim is {owner!r}"
        return None

    return check


def _closed(cluster: Cluster, config_id: Any = None) -> bool:
    """Every instance (of ``config_id``) so far is disconnected."""
    return all(iv.end is not None for iv in cluster.ledger.intervals(config_id))


def test_a_disconnect_that_could_not_start_keeps_its_claim(
    redis_url: str, service: str, redis_client: redis.Redis, no_watchdog: ThreadLimit
) -> None:
    """A node that cannot start the thread that times its disconnects (its stop threads
    started) keeps the claims: the instances still run, so the configs' new owner waits.
    The disconnects are tried again on every tick and run once threads can be started;
    then the configs move, and none ran in two places."""
    cluster = Cluster(redis_url, service, [{"id": i} for i in range(4)])
    try:
        no_watchdog.set()
        (first,) = cluster.add(1)
        no_watchdog.prefix = f"dim-watch-{first.node_id}"  # the next node has its own
        cluster.wait_settled()
        no_watchdog.refused = 0
        cluster.add(1)  # two configs move
        wait_until(lambda: no_watchdog.refused >= 1, 10, message="no disconnect was tried")
        check = _released_while_running(cluster, redis_client, first.node_id)
        _holds(check, 1.0, "a claim was let go while its instance ran")
        assert no_watchdog.refused >= 3, "the disconnects were not tried again"
        no_watchdog.clear()
        cluster.wait_balanced(timeout=15)
        assert cluster.ledger.overlaps() == []
        assert cluster.ledger.create_count() == 6
        assert cluster.ledger.disconnect_count() == 2
    finally:
        no_watchdog.clear()
        cluster.stop()


def test_a_graceful_stop_holds_each_claim_until_its_disconnect_could_run(
    redis_url: str, service: str, redis_client: redis.Redis, no_watchdog: ThreadLimit
) -> None:
    """stop() while no thread can be started to time the disconnects: the claims stay
    held, the disconnects are tried again while stop() waits, and they run (and the
    claims are released) once threads can be started again, within stop()'s bound."""
    keys = Keys(service)
    settings = FAST.replace(disconnect_timeout=5.0)
    cluster = Cluster(redis_url, service, [{"id": i} for i in range(2)], settings)
    try:
        no_watchdog.set()
        (manager,) = cluster.add(1)
        cluster.wait_settled()
        no_watchdog.refused = 0
        stopping = threading.Thread(target=manager.stop, name="test-stop")
        stopping.start()
        wait_until(lambda: no_watchdog.refused >= 1, 10, message="no disconnect was tried")
        check = _released_while_running(cluster, redis_client, manager.node_id)
        _holds(check, 0.5, "a claim was let go while its instance ran")
        no_watchdog.clear()
        stopping.join(settings.stop_timeout + 5)
        assert not stopping.is_alive(), "stop() did not return"
        assert cluster.ledger.disconnect_count() == 2
        assert [c for c in ("0", "1") if redis_client.exists(keys.claim(c))] == []
    finally:
        no_watchdog.clear()
        cluster.stop()


def test_a_disconnect_that_cannot_start_is_tried_once_per_heartbeat(
    redis_url: str, service: str, no_watchdog: ThreadLimit
) -> None:
    """A disconnect that cannot start is tried again once per heartbeat, not in a loop:
    the failed try wakes the reconciler, which must not try again at once."""
    cluster = Cluster(redis_url, service, [{"id": 0}])
    try:
        no_watchdog.set()
        cluster.add(1)
        cluster.wait_settled()
        no_watchdog.refused = 0
        cluster.configs = []
        wait_until(lambda: no_watchdog.refused >= 1, 10, message="no disconnect was tried")
        start, before = time.monotonic(), no_watchdog.refused

        def too_often() -> Optional[str]:
            tries, spent = no_watchdog.refused - before, time.monotonic() - start
            allowed = 2 + 1.5 * spent / FAST.heartbeat_interval
            return f"{tries} tries in {spent:.2f} s" if tries > allowed else None

        _holds(too_often, 1.0, "the disconnect was tried more than once per heartbeat")
        assert no_watchdog.refused - before >= 2, "the disconnect was not tried again"
    finally:
        no_watchdog.clear()
        cluster.stop()


def test_a_graceful_stop_disconnects_even_when_no_thread_can_be_started(
    redis_url: str, service: str, redis_client: redis.Redis, no_watchdog: ThreadLimit
) -> None:
    """When no thread can be started to time the disconnects until stop()'s deadline,
    stop() runs them without a time limit and waits for them, rather than leave the
    instances running with claims that lapse: they are disconnected, reported, and their
    claims released."""
    keys = Keys(service)
    cluster = Cluster(redis_url, service, [{"id": 0}, {"id": 1}])
    try:
        no_watchdog.set()
        (manager,) = cluster.add(1)
        cluster.wait_settled()
        seen = _events(manager, EventType.INSTANCE_DISCONNECTED)
        no_watchdog.refused = 0
        manager.stop(timeout=0.3)
        assert no_watchdog.refused >= 2, "a disconnect found its watchdog"
        assert _closed(cluster)
        assert sorted(e.config_id for e in seen if e.error is None) == [0, 1]
        assert [c for c in ("0", "1") if redis_client.exists(keys.claim(c))] == []
    finally:
        no_watchdog.clear()
        cluster.stop()


def test_a_disconnect_retried_across_the_stop_deadline_still_runs(
    redis_url: str, service: str, no_watchdog: ThreadLimit
) -> None:
    """A retry of a disconnect still failing to get its thread when stop() passes its
    deadline (and returns) is not dropped: it runs on its stop thread."""
    late = threading.Event()
    cluster = Cluster(redis_url, service, [{"id": 0}])
    try:
        no_watchdog.set()
        (manager,) = cluster.add(1)
        cluster.wait_settled()
        no_watchdog.refused = 0
        no_watchdog.stall = lambda refused: refused >= 2 and late.wait(10)  # the retries
        manager.stop(timeout=0.3)
        assert not _closed(cluster)
        late.set()
        wait_until(lambda: _closed(cluster), 5, message="the instance was left running")
    finally:
        no_watchdog.clear()
        late.set()
        cluster.stop()


def test_a_create_that_returns_after_stop_is_undone(redis_url: str, service: str) -> None:
    """A create still running when stop() returns gives an instance nobody keeps: it is
    disconnected (without a time limit: the node's watchdog is gone)."""
    gate, entered = threading.Event(), threading.Event()

    def create(node: str, config: Any) -> None:
        entered.set()
        gate.wait(10)

    settings = FAST.replace(create_timeout=5.0)
    cluster = Cluster(redis_url, service, [], settings, create=create)
    try:
        (manager,) = cluster.add(1)
        assert manager.wait_until_stable(10)
        cluster.configs = [{"id": 0}]
        manager.refresh()
        wait_until(entered.is_set, 10, message="create was not called")
        manager.stop(timeout=0.1)
        gate.set()
        wait_until(lambda: _closed(cluster), 5, message="the instance was left running")
    finally:
        gate.set()
        cluster.stop()


def test_a_last_disconnect_without_a_stop_thread_keeps_its_time_limit(
    redis_url: str, service: str, no_stop_threads: ThreadLimit
) -> None:
    """A disconnect that got no stop thread until stop()'s deadline runs on a call thread
    with its time limit when one starts: a disconnect that hangs does not hold stop()."""
    gate = threading.Event()
    cluster = Cluster(redis_url, service, [{"id": 0}], disconnect=lambda node, i: gate.wait(20))
    try:
        (manager,) = cluster.add(1)
        cluster.wait_settled()
        no_stop_threads.prefix = f"dim-stop-{manager.node_id}"
        no_stop_threads.set()
        stopping = threading.Thread(target=manager.stop, kwargs={"timeout": 0.3})
        stopping.start()
        stopping.join(0.3 + FAST.disconnect_timeout + 5)
        assert not stopping.is_alive(), "stop() waited for a disconnect past its time limit"
        assert no_stop_threads.refused >= 1
    finally:
        no_stop_threads.clear()
        gate.set()
        cluster.stop()


def test_an_overrun_is_let_go_on_time_while_redis_stalls_another_release(
    own_redis: RedisServer, service: str
) -> None:
    """Two disconnects hang, the second started 0.4 s after the first; Redis stalls from
    just before the first one's deadline until after the second one's. Each overrun is
    still reported at its own deadline: letting go of the first (its claim's release waits
    for Redis) does not hold up the second."""
    gate = threading.Event()
    started: dict[Any, float] = {}
    reported: dict[Any, float] = {}

    def disconnect(node: str, instance: Any) -> None:
        started[instance.config["id"]] = time.monotonic()
        gate.wait(20)

    # a heartbeat of 1 s gives Redis calls a 1 s timeout: a stall holds a release that long
    settings = FAST.replace(heartbeat_interval=1.0, node_ttl=6.0, leader_ttl=6.0)
    cluster = Cluster(
        own_redis.url, service, [{"id": 0}, {"id": 1}], settings, disconnect=disconnect
    )
    try:
        (manager,) = cluster.add(1)
        manager.add_listener(
            lambda e: reported.setdefault(e.config_id, time.monotonic()),
            EventType.DISCONNECT_TIMEOUT,
        )
        cluster.wait_settled()
        cluster.configs = [{"id": 1}]
        manager.refresh()
        wait_until(lambda: 0 in started, 10, message="the first disconnect did not start")
        wait_until(lambda: time.monotonic() >= started[0] + 0.4, 5)  # the fault's moment
        cluster.configs = []
        manager.refresh()
        wait_until(lambda: 1 in started, 10, message="the second disconnect did not start")
        deadline = settings.disconnect_timeout
        assert started[1] < started[0] + deadline - 0.15, "the fault would come too late"
        wait_until(lambda: time.monotonic() >= started[0] + deadline - 0.15, 5)
        own_redis.pause()
        wait_until(lambda: 1 in reported, 10, message="the second overrun was not reported")
        own_redis.resume()
        late = {c: reported[c] - started[c] - deadline for c in (0, 1)}
        assert max(late.values()) < 0.5, f"reported this late after their deadlines: {late}"
    finally:
        if own_redis.paused:
            own_redis.resume()
        gate.set()
        cluster.stop()


class _BlockFirstOverrunLog(logging.Handler):
    """A log handler that blocks on the first overrun it is given, until ``gate``."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.gate = threading.Event()
        self.blocked = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "did not return within" in str(record.msg) and not self.blocked.is_set():
            self.blocked.set()
            self.gate.wait(30)


def test_an_overrun_is_let_go_on_time_while_a_log_handler_blocks_on_another(
    redis_url: str, redis_client: redis.Redis, service: str
) -> None:
    """The report of one overrun (its log record, its event) never holds up the next: a
    log handler that blocks on the first overrun's record does not keep the second one's
    claim held past its deadline, nor its DISCONNECT_TIMEOUT unsent."""
    cluster, gate, started = _hanging_disconnects(redis_url, service)
    handler = _BlockFirstOverrunLog()
    dim_log = logging.getLogger("dim")
    keys = Keys(service)
    try:
        (manager,) = cluster.add(1)
        reported: list[Any] = []
        manager.add_listener(lambda e: reported.append(e.config_id), EventType.DISCONNECT_TIMEOUT)
        cluster.wait_settled()
        dim_log.addHandler(handler)
        cluster.configs = [{"id": 1}]
        manager.refresh()
        assert handler.blocked.wait(10), "the first overrun was not logged"
        cluster.configs = []
        manager.refresh()
        wait_until(lambda: 1 in started, 10, message="the second disconnect did not start")
        wait_until(
            lambda: redis_client.get(keys.claim("1")) is None and 1 in reported,
            FAST.disconnect_timeout + 2.0,
            message="the second overrun was not let go while a log handler blocked",
        )
        assert redis_client.get(keys.claim("0")) is None
    finally:
        handler.gate.set()
        dim_log.removeHandler(handler)
        gate.set()
        cluster.stop()


def test_an_overruns_events_come_before_the_next_instance_of_its_config(
    redis_url: str, service: str
) -> None:
    """An overrun's DISCONNECT_TIMEOUT and INSTANCE_DISCONNECTED reach the listeners before
    the INSTANCE_CREATED of the config's next instance on the node, even when a log
    handler holds the overrun's log record until that instance exists."""
    gate, created = threading.Event(), threading.Event()
    armed = threading.Event()

    def disconnect(node: str, instance: Any) -> None:
        if armed.is_set():
            gate.wait(20)

    class HoldsTheOverrunLog(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "did not return within" in str(record.msg):
                created.wait(5)

    cluster = Cluster(redis_url, service, [{"id": 0, "v": 1}], disconnect=disconnect)
    handler = HoldsTheOverrunLog(logging.WARNING)
    dim_log = logging.getLogger("dim")
    try:
        (manager,) = cluster.add(1)
        cluster.wait_settled()
        seen: list[str] = []

        def heard(event: Event) -> None:
            seen.append(event.type.value)
            if event.type is EventType.INSTANCE_CREATED:
                created.set()

        kinds = (
            EventType.INSTANCE_CREATED,
            EventType.INSTANCE_DISCONNECTED,
            EventType.DISCONNECT_TIMEOUT,
        )
        manager.add_listener(heard, *kinds)
        dim_log.addHandler(handler)
        armed.set()
        cluster.configs = [{"id": 0, "v": 2}]  # recreated: the disconnect overruns
        manager.refresh()
        wait_until(lambda: "instance_created" in seen, 10, message="no new instance")
        wait_until(lambda: "instance_disconnected" in seen, 10, message="no disconnect")
        assert seen == ["disconnect_timeout", "instance_disconnected", "instance_created"]
    finally:
        created.set()
        dim_log.removeHandler(handler)
        gate.set()
        cluster.stop()


def _hanging_disconnects(
    redis_url: str, service: str
) -> tuple[Cluster, threading.Event, list[Any]]:
    """A cluster of configs 0 and 1 whose disconnects record their config id, then hang
    until the gate is set."""
    gate = threading.Event()
    started: list[Any] = []

    def disconnect(node: str, instance: Any) -> None:
        started.append(instance.config["id"])
        gate.wait(20)

    cluster = Cluster(redis_url, service, [{"id": 0}, {"id": 1}], disconnect=disconnect)
    return cluster, gate, started


def test_a_graceful_stop_releases_the_claims_of_its_overruns_before_it_returns(
    redis_url: str, service: str, redis_client: redis.Redis, no_stop_threads: ThreadLimit
) -> None:
    """Disconnects that overrun at stop() are let go at their deadlines, and their claims
    are released by the time stop() returns, even when no thread can be started then to
    release them."""
    cluster, gate, started = _hanging_disconnects(redis_url, service)
    keys = Keys(service)
    try:
        (manager,) = cluster.add(1)
        cluster.wait_settled()
        stopping = threading.Thread(target=manager.stop, name="test-stop")
        stopping.start()
        wait_until(lambda: len(started) == 2, 10, message="the disconnects did not start")
        no_stop_threads.prefix = f"dim-stop-{manager.node_id}"
        no_stop_threads.set()
        stopping.join(FAST.stop_timeout + 5)
        assert not stopping.is_alive(), "stop() did not return"
        assert [c for c in ("0", "1") if redis_client.exists(keys.claim(c))] == []
    finally:
        no_stop_threads.clear()
        gate.set()
        cluster.stop()


def test_an_overruns_claim_is_released_at_the_next_tick_when_no_thread_starts(
    redis_url: str, service: str, redis_client: redis.Redis, no_stop_threads: ThreadLimit
) -> None:
    """A disconnect that overruns as its config moves away is let go at its deadline;
    when no thread can be started then to release its claim, the next tick of the
    reconciler releases it, rather than leave the config to wait out the claim's TTL."""
    cluster, gate, started = _hanging_disconnects(redis_url, service)
    keys = Keys(service)
    try:
        (manager,) = cluster.add(1)
        overran = _events(manager, EventType.DISCONNECT_TIMEOUT)
        cluster.wait_settled()
        cluster.configs = [{"id": 1}]
        manager.refresh()
        wait_until(lambda: started == [0], 10, message="the disconnect did not start")
        no_stop_threads.prefix = f"dim-stop-{manager.node_id}"
        no_stop_threads.set()
        wait_until(lambda: overran, 10, message="the overrun was not reported")
        # unreleased, the claim would live its lease (1.6 s) past its last renewal
        wait_until(
            lambda: not redis_client.exists(keys.claim("0")),
            FAST.lease * 0.6,
            message="the claim was not released",
        )
        assert no_stop_threads.refused >= 1, "the release found a thread"
    finally:
        no_stop_threads.clear()
        gate.set()
        cluster.stop()


def test_a_late_instance_is_disconnected_when_no_thread_can_be_started(
    redis_url: str, service: str, no_call_threads: ThreadLimit
) -> None:
    """A create that returns after its timeout gives an instance nobody keeps: it is
    disconnected on the thread that created it when no other thread can be started,
    rather than left running."""
    gate = threading.Event()
    entered = threading.Event()

    def create(node: str, config: Any) -> None:
        if not entered.is_set():
            entered.set()
            gate.wait(10)  # the first attempt overruns create_timeout (1 s)

    cluster = Cluster(redis_url, service, [], FAST.replace(max_workers=1), create=create)
    try:
        (manager,) = cluster.add(1)
        assert manager.wait_until_stable(10)
        timeouts = _events(manager, EventType.CREATE_FAILED)
        no_call_threads.prefix = f"dim-call-{manager.node_id}"
        cluster.configs = [{"id": 0}]
        manager.refresh()
        wait_until(entered.is_set, 10, message="create was not called")
        no_call_threads.set()  # the first attempt's thread runs; no other can start
        wait_until(lambda: timeouts, 10, message="the first attempt did not time out")
        gate.set()
        wait_until(
            lambda: [iv for iv in cluster.ledger.intervals() if iv.end is not None],
            10,
            message="the late instance was left running",
        )
        no_call_threads.clear()
        cluster.wait_settled(timeout=15)
        # the retry does not wait for the overrun call (by design: protocol.rst §9), so
        # the late instance may overlap it until its disconnect; none but that one
        late, retry = sorted(cluster.ledger.intervals(), key=lambda iv: iv.inst)
        assert late.end is not None and retry.end is None
        pairs = [{a.inst, b.inst} for a, b in cluster.ledger.overlaps()]
        assert all(pair == {late.inst, retry.inst} for pair in pairs), pairs
        assert cluster.ledger.create_count() == 2
    finally:
        no_call_threads.clear()
        gate.set()
        cluster.stop()


class _OneWorkerNode:
    """A node with one worker place and short create and disconnect budgets (0.3 s and
    0.2 s), whose configs are what ``configs`` holds when the leader asks. The
    disconnect of config 0's instance overruns (``entered`` says it began) and the first
    create of config 1 hangs, each until ``gate`` is set."""

    def __init__(self, redis_url: str, service: str, gate: threading.Event) -> None:
        self.gate = gate
        self.entered = threading.Event()
        self.made: list[Any] = []
        self.configs: list[Any] = [0]
        settings = FAST.replace(create_timeout=0.3, disconnect_timeout=0.2, max_workers=1)
        self.manager = Manager(
            lambda: list(self.configs),
            self._create,
            disconnect=self._disconnect,
            redis=redis_url,
            service=service,
            settings=settings,
        )
        self.timeouts = _events(self.manager, EventType.DISCONNECT_TIMEOUT)

    def _create(self, config: Any) -> Any:
        self.made.append(config)
        if config == 1 and self.made.count(1) == 1:
            self.gate.wait(30)  # the first attempt hangs until the end of the test
        return f"instance {config}"

    def _disconnect(self, instance: Any) -> None:
        if instance == "instance 0":
            self.entered.set()
            self.gate.wait(30)  # overruns disconnect_timeout

    def start(self) -> None:
        """Start the node and wait until config 0 runs."""
        self.manager.start()
        wait_until(lambda: self.manager.instances.get(0) == "instance 0", 10)

    def place(self, *configs: Any) -> None:
        """The node's configs are these now: the leader is told at once."""
        self.configs[:] = configs
        self.manager.refresh()


class _BlockOnOverrunLog(logging.Handler):
    """A log handler that blocks (a stuck network handler) on the log line of an overrun
    disconnect when the watchdog writes it, until ``gate`` is set. (Blocking on any
    thread would also block every other thread that logs, on the handler's lock.)"""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__()
        self.gate = gate
        self.threads: list[str] = []  # the threads that wrote that line

    def emit(self, record: logging.LogRecord) -> None:
        if "disconnect of config" in str(record.msg):
            self.threads.append(threading.current_thread().name)
            if threading.current_thread().name.startswith("dim-watch-"):
                self.gate.wait(30)


def test_the_watchdog_never_logs_itself_when_no_thread_starts(
    redis_url: str, service: str, no_call_threads: ThreadLimit
) -> None:
    """The watchdog times creates as well as disconnects, so it never writes a log line
    itself: an overrun's lines that find no thread wait until one starts, and a log
    handler that blocks on them holds up no later deadline (here, a hanging create's,
    whose worker place the next config waits for: max_workers is 1)."""
    gate = threading.Event()
    handler = _BlockOnOverrunLog(gate)
    logging.getLogger("dim.reconciler").addHandler(handler)
    node = _OneWorkerNode(redis_url, service, gate)
    manager = node.manager
    try:
        node.start()
        no_call_threads.set()
        node.place()
        wait_until(
            lambda: node.timeouts and no_call_threads.refused >= 1,
            10,
            message="the overrun's log lines did not look for a thread",
        )
        no_call_threads.clear()  # they find one now
        wait_until(lambda: handler.threads, 10, message="the overrun was never logged")
        node.place(1, 2)
        wait_until(
            lambda: manager.instances.get(2) == "instance 2",
            10,
            message="config 2 was never created while config 1 hangs",
        )
        assert not [t for t in handler.threads if t.startswith("dim-watch-")], node.made
    finally:
        gate.set()
        logging.getLogger("dim.reconciler").removeHandler(handler)
        manager.stop()


class _BlockOnWatchdogFilter(logging.Filter):
    """A handler's filter that blocks (a stuck network handler) on any record written on
    the watchdog thread, until ``gate`` is set. Handler filters run before the handler's
    lock is taken: no other thread is held up."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__()
        self.gate = gate
        self.lines: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if threading.current_thread().name.startswith("dim-watch-"):
            self.lines.append(record.getMessage())
            self.gate.wait(30)
        return True


def test_the_watchdog_logs_nothing_when_no_thread_can_release_an_overruns_claim(
    redis_url: str, service: str, no_stop_threads: ThreadLimit
) -> None:
    """A disconnect overruns while no stop thread can be started: the release of its
    claim waits for the reconciler's tick, and the watchdog must not log that itself (a
    log handler that blocks would stop it timing every create: a hanging create would
    keep its worker place for good, and config 2 here would never be created)."""
    gate = threading.Event()
    blocker = _BlockOnWatchdogFilter(gate)
    handler = Quiet()
    handler.addFilter(blocker)
    logging.getLogger("dim").addHandler(handler)
    node = _OneWorkerNode(redis_url, service, gate)
    manager = node.manager
    try:
        node.start()
        node.place()
        wait_until(node.entered.is_set, 10, message="the disconnect was not called")
        no_stop_threads.set()  # the overrun's release finds no thread
        wait_until(lambda: node.timeouts, 10, message="the disconnect did not overrun")
        node.place(1, 2)
        created = comes_true(lambda: manager.instances.get(2) == "instance 2", 10)
        assert created and not blocker.lines, (
            f"config 2 created: {created}; the watchdog logged {blocker.lines}; made {node.made}"
        )
    finally:
        gate.set()
        no_stop_threads.clear()
        logging.getLogger("dim").removeHandler(handler)
        manager.stop()


def test_a_stalled_create_is_logged_with_the_error_that_stalled_it(
    redis_url: str,
    service: str,
    no_worker_threads: ThreadLimit,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A create overruns while no worker thread can be started: the task that goes on
    waits for a thread, every tick says why (with the error of the start that failed,
    though that start was the watchdog's), and it runs once threads start again."""
    gate = threading.Event()
    made: list[Any] = []

    def create(config: Any) -> Any:
        made.append(config)
        if len(made) == 1:
            gate.wait(30)
        return f"instance {config}"

    settings = FAST.replace(create_timeout=0.3, max_workers=1)
    manager = Manager(lambda: [1], create, redis=redis_url, service=service, settings=settings)
    caplog.set_level(logging.ERROR, logger="dim.reconciler")
    try:
        manager.start()
        wait_until(lambda: made, 10, message="create was not called")
        no_worker_threads.set()
        wait_until(
            lambda: any(
                "could not start a thread to create" in r.getMessage() for r in caplog.records
            ),
            10,
            message="the stall was never reported",
        )
        lines = [
            r.getMessage()
            for r in caplog.records
            if "could not start a thread to create" in r.getMessage()
        ]
        no_worker_threads.clear()
        wait_until(lambda: manager.instances.get(1) == "instance 1", 10)
        assert "(None)" not in lines[0], lines[0]
    finally:
        no_worker_threads.clear()
        gate.set()
        manager.stop()


def test_fence_disconnects_once_threads_start_again(
    own_redis: RedisServer, service: str, no_stop_threads: ThreadLimit
) -> None:
    """A node cut off from Redis fences; if its disconnect threads cannot be started at
    that moment, every instance is still disconnected as soon as they can, while Redis is
    still away."""
    cluster = Cluster(own_redis.url, service, [{"id": i} for i in range(3)])
    try:
        (manager,) = cluster.add(1)
        fenced = _events(manager, EventType.FENCED)
        cluster.wait_settled()
        no_stop_threads.set()
        own_redis.pause()
        wait_until(lambda: fenced, 10, message="the node did not fence")
        no_stop_threads.clear()
        wait_until(
            lambda: cluster.ledger.disconnect_count() == 3,
            10,
            message="the fenced node did not disconnect its 3 instances",
        )
        assert own_redis.paused
    finally:
        no_stop_threads.clear()
        if own_redis.paused:
            own_redis.resume()
        cluster.stop()


# -- a log handler that blocks -----------------------------------------------------------


class BlockingHandler(logging.Handler):
    """Blocks the thread that logs the fence (and anything that thread logs later) until
    released: a log sink on a dead socket, seen from the thread that fences."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.gate = threading.Event()
        self.blocked: Optional[str] = None

    def emit(self, record: logging.LogRecord) -> None:
        name = threading.current_thread().name
        if "could not renew" in str(record.msg) or name == self.blocked:
            self.blocked = name
            self.gate.wait(60)


def test_fence_starts_disconnects_before_it_logs(own_redis: RedisServer, service: str) -> None:
    """A log handler that blocks the fence thread does not hold up the disconnects: they
    all start before the fence logs anything, and return while Redis is still away."""
    cluster = Cluster(own_redis.url, service, [{"id": i} for i in range(3)])
    handler: Optional[BlockingHandler] = None
    dim_log = logging.getLogger("dim")
    try:
        cluster.add(1)
        cluster.wait_settled()
        handler = BlockingHandler()
        dim_log.addHandler(handler)
        own_redis.pause()
        wait_until(
            lambda: cluster.ledger.disconnect_count() == 3,
            10,
            message="the disconnects did not run while the fence's log handler blocked",
        )
        assert own_redis.paused
    finally:
        if handler is not None:
            handler.gate.set()
            dim_log.removeHandler(handler)
        if own_redis.paused:
            own_redis.resume()
        cluster.stop()


# -- stop() while a healthcheck hangs ----------------------------------------------------


def test_stop_ends_every_loop_while_a_healthcheck_hangs(redis_url: str, service: str) -> None:
    """stop() does not wait for a healthcheck that hangs (its timeout is long), and when it
    returns none of the node's loop threads is left running."""
    release = threading.Event()
    started = threading.Event()

    def healthcheck(instance: Any) -> bool:
        started.set()
        release.wait(60)
        return True

    settings = FAST.replace(healthcheck_interval=0.05, healthcheck_timeout=30.0)
    manager = Manager(
        lambda: [0],
        lambda c: {"c": c},
        healthcheck=healthcheck,
        redis=redis_url,
        service=service,
        settings=settings,
    )
    manager.start()
    try:
        node = manager.node_id
        wait_until(started.is_set, 10, message="the healthcheck never ran")
        manager.stop()
        loops = [
            t.name
            for role in ("heartbeat", "fence", "reconciler", "leader", "listener", "health")
            for t in _threads(f"dim-{role}-{node}")
        ]
        assert loops == [], f"loop threads still running after stop(): {loops}"
    finally:
        release.set()
        manager.stop()


def test_stop_ends_the_listener_without_waiting_out_its_read(
    redis_url: str, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle listener blocks in its read for a long time (it wakes rarely), yet stop()
    ends it at once, a follower's and the leader's: the node's own ``left`` hint ends the
    read under way (stop() would otherwise give up on the thread after one second)."""
    monkeypatch.setattr("dim.listener.POLL", 60.0)
    managers = [
        Manager(lambda: [0, 1], lambda c: {"c": c}, redis=redis_url, service=service, settings=FAST)
        for _ in range(2)
    ]
    for manager in managers:
        manager.start()
    try:
        assert all(m.wait_until_stable(10) for m in managers)
        # the follower first, then the leader (alone by then)
        for manager in sorted(managers, key=lambda m: m.is_leader):
            node = manager.node_id
            listening = _threads(f"dim-listener-{node}")
            assert len(listening) == 1
            manager.stop()
            assert not listening[0].is_alive(), f"{node}'s listener outlived stop()"
    finally:
        for manager in managers:
            manager.stop()


def test_a_leaving_node_s_listener_reads_no_more(
    redis_url: str, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once its node leaves, the listener starts no read: the read under way ends (at
    the latest on the node's own ``left`` hint), and stop() then waits for no read of
    the listener, however long its disconnects take (a read would cost it the read's
    wait)."""
    gate = threading.Event()
    manager = Manager(
        lambda: [0],
        lambda c: {"c": c},
        disconnect=lambda instance: gate.wait(10),
        redis=redis_url,
        service=service,
        settings=FAST.replace(disconnect_timeout=3.0),
    )
    manager.start()
    stopper = threading.Thread(target=manager.stop, name="test-stop")
    try:
        assert manager.wait_until_stable(10)
        node = manager._node
        assert node is not None and isinstance(node.listener, HintListener)
        listener = node.listener
        pubsub = listener._pubsub
        assert pubsub is not None
        get_message = pubsub.get_message
        entered, ended, reads_after = threading.Event(), threading.Event(), []

        def read(*a: Any, **kw: Any) -> Any:
            entered.set()
            if ended.is_set():
                reads_after.append(kw.get("timeout"))
            raw = get_message(*a, **kw)
            if node.leaving:
                ended.set()  # a read has returned since the node began to leave
            return raw

        monkeypatch.setattr(pubsub, "get_message", read)
        # the read under way when the node leaves goes through the patch
        wait_until(entered.is_set, 5, message="the listener did not read again")
        stopper.start()
        # the disconnect is held: the listener either reads on or lets its subscription go
        wait_until(lambda: reads_after or listener._pubsub is None, 5)
        # ... by itself, while stop() still waits for the disconnect (not stop()'s close)
        assert not node.stop_event.is_set()
        gate.set()
        stopper.join(15)
        assert not stopper.is_alive()
        assert reads_after == [], f"the listener read on after its node left: {reads_after}"
    finally:
        gate.set()
        if stopper.is_alive():
            stopper.join(15)
        manager.stop()


def test_a_node_that_leaves_before_its_listener_subscribed_waits_for_no_subscription(
    redis_url: str, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reconciler's first read waits (up to a second) for the listener to subscribe.
    A listener whose first tick comes only once its node leaves never subscribes: it
    says so, and that wait ends at once rather than holding stop() up to a second."""
    waits: list[bool] = []
    waiting = threading.Event()

    class Subscribed(threading.Event):
        def wait(self, timeout: Optional[float] = None) -> bool:
            waiting.set()
            # (longer than its second: what ends it must be the listener's word, even
            # on a loaded machine; a wait not ended is missing below)
            came = super().wait(10.0)
            waits.append(came)
            return came

    init = Node.__init__

    def node_init(self: Node, *a: Any, **kw: Any) -> None:
        init(self, *a, **kw)
        self.subscribed = Subscribed()

    tick = HintListener.tick

    def late_tick(self: HintListener) -> float:
        # the listener thread is held back until its node leaves
        wait_until(lambda: self.node.leaving, 10)
        return tick(self)

    opened: list[HintListener] = []
    open_ = HintListener._open

    def counted_open(self: HintListener) -> Any:
        opened.append(self)
        return open_(self)

    monkeypatch.setattr(Node, "__init__", node_init)
    monkeypatch.setattr(HintListener, "tick", late_tick)
    monkeypatch.setattr(HintListener, "_open", counted_open)
    manager = Manager(lambda: [], lambda c: c, redis=redis_url, service=service)
    try:
        manager.start()
        assert waiting.wait(5), "the reconciler's first read did not wait for the listener"
        manager.stop()
        assert opened == [], "the listener subscribed although its node was leaving"
        assert waits == [True], f"the wait for the subscription did not end: {waits}"
    finally:
        manager.stop()


# -- a placement rule that hangs -----------------------------------------------------------


def test_a_hanging_placement_rule_does_not_hang_the_leader(
    redis_url: str, service: str, redis_client: redis.Redis
) -> None:
    """A new leader whose get_config has not answered yet places the configs stored in
    Redis with its placement rules; a rule that hangs there runs on the config thread:
    the leader places without it meanwhile, keeps its leadership (config_timeout, 10 s,
    is longer than leader_ttl), and stop() returns within its bound."""
    release = threading.Event()
    configs = [{"id": i} for i in range(4)]
    evaluated = threading.Event()

    def hanging_source() -> list[Any]:
        release.wait(60)
        return configs

    def hanging_rule(config: Any) -> None:
        evaluated.set()
        release.wait(60)

    first = Manager(
        lambda: configs, lambda c: {"c": c}, redis=redis_url, service=service, settings=FAST
    )
    second = Manager(
        hanging_source,
        lambda c: {"c": c},
        requires=hanging_rule,
        redis=redis_url,
        service=service,
        settings=FAST,
    )
    stopper: Optional[threading.Thread] = None
    try:
        first.start()
        assert first.wait_until_stable(10)
        second.start()
        first.stop()  # the second node leads now, with the stored configs only
        wait_until(lambda: second.is_leader, 10, message="the second node did not lead")
        wait_until(
            lambda: set(second.instances) == {0, 1, 2, 3},
            15,
            message=f"the new leader did not place the stored configs: {second.instances}",
        )
        wait_until(evaluated.is_set, 10, message="the rule was never called")
        leader_key = Keys(service).leader
        held = redis_client.get(leader_key)
        assert held is not None and held.decode().startswith(f"{second.node_id}:")
        _holds(
            lambda: (
                None
                if redis_client.get(leader_key) == held
                else f"the leader key went from {held!r} to {redis_client.get(leader_key)!r}"
            ),
            3 * FAST.leader_ttl,
            "a hanging placement rule cost the leadership (its epoch)",
        )
        stopper = threading.Thread(target=second.stop, name="test-stop", daemon=True)
        began = time.monotonic()
        stopper.start()
        stopper.join(FAST.stop_timeout + 3)
        assert not stopper.is_alive(), (
            f"stop() did not return within {time.monotonic() - began:.1f} s while a "
            "placement rule hangs"
        )
    finally:
        release.set()
        if stopper is not None:
            stopper.join(15)
        first.stop()
        second.stop()


def test_a_transition_error_in_a_task_lets_the_slot_go_and_the_config_runs_again(
    redis_url: str, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong transition (a bug, here provoked by a retoken that hands back the same
    token) inside a worker task does not strand the slot in CREATING with its claim
    renewed forever: the task lets the slot and its claim go, and the config is claimed
    and created again."""
    sick = {0}
    gens = itertools.count(1)

    def create(config: Any) -> dict[str, int]:
        return {"config": config, "gen": next(gens)}

    def healthcheck(instance: Any) -> bool:
        if instance["config"] in sick:
            sick.discard(instance["config"])
            return False  # recreate it in place: the retoken path
        return True

    manager, unhealthy = _checked_manager(redis_url, service, create, healthcheck)
    try:
        node = manager._node  # type: ignore[attr-defined]
        assert node is not None
        store = node.store
        real_retoken = store.retoken
        broken: list[int] = []

        def same_token(node_id: str, ckey: str, token: int, ttl: float) -> int:
            if not broken:
                broken.append(token)
                return token  # not larger: Slot.retokened raises TransitionError
            return real_retoken(node_id, ckey, token, ttl)

        monkeypatch.setattr(store, "retoken", same_token)
        wait_until(lambda: unhealthy and broken, 10, message="no recreate was attempted")
        wait_until(
            lambda: manager.instances.get(0, {}).get("gen", 0) > 2,
            10,
            message="config 0 never ran again after the failed transition",
        )
        assert manager.lease(0) is not None and manager.lease(0).token > broken[0]  # type: ignore[union-attr]
        assert sorted(manager.instances) == [0, 1]
    finally:
        manager.stop()


def test_a_node_with_no_instances_runs_only_its_loops(redis_url: str, service: str) -> None:
    """A node that runs nothing has its loops and no pool: heartbeat, fence, reconciler,
    leader, listener and events (and the leader's config thread, kept for get_config).
    The worker and watchdog threads start with the first instance, whose create runs on
    its worker (no call thread); a disconnect takes an idle thread (a stop's, else one a
    create left) or starts a stop thread."""
    managers = [
        Manager(
            get_config=lambda: [{"id": 1}],
            create=lambda config: config,
            disconnect=lambda instance: None,
            redis=redis_url,
            service=service,
            settings=FAST,
        )
        for _ in range(2)
    ]
    for m in managers:
        m.start()
    try:
        wait_until(lambda: sum(len(m.instances) for m in managers) == 1, 10)
        runs, idle = sorted(managers, key=lambda m: -len(m.instances))

        def roles(m: Manager) -> set[str]:
            names = [t.name for t in threading.enumerate() if t.name.startswith("dim-")]
            return {n.split("-")[1] for n in names if m.node_id in n}

        loops = {"heartbeat", "fence", "reconciler", "leader", "listener", "events"}
        assert loops <= roles(idle) <= loops | {"config"}
        assert "config" not in roles(idle) or idle.is_leader
        assert {"worker", "watch"} <= roles(runs)
        assert "call" not in roles(runs)
    finally:
        for m in managers:
            m.stop()


def test_a_stop_takes_a_thread_that_a_create_left_idle(
    redis_url: str, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Creates and stops share one pool of idle threads: a node whose three creates ran
    at once keeps three idle threads, and when its three configs are removed it starts no
    thread for the disconnects (stop() goes the same way); each disconnect still runs on a
    thread of its own, named for it, all three at once. A create never takes a thread a
    stop left idle."""
    started: list[str] = []
    original = threading.Thread.start

    def counting_start(self: threading.Thread) -> None:
        if self.name.startswith(("dim-worker-", "dim-stop-")):
            started.append(self.name)
        original(self)

    monkeypatch.setattr(threading.Thread, "start", counting_start)
    together = threading.Barrier(3, timeout=10)  # three creates in flight at once
    inside: list[str] = []
    all_in = threading.Event()
    out = threading.Event()

    def create(node: str, config: Any) -> None:
        if config["id"] < 3:
            together.wait()

    def disconnect(node: str, instance: Any) -> None:
        inside.append(threading.current_thread().name)
        if len(inside) == 3:
            all_in.set()
        all_in.wait(5)  # each waits for the three to be in: they run at once
        out.set()

    cluster = Cluster(
        redis_url, service, [{"id": i} for i in range(3)], create=create, disconnect=disconnect
    )
    try:
        (manager,) = cluster.add(1)
        cluster.wait_settled()
        node = manager.node_id
        assert node is not None
        assert len(_threads(f"dim-worker-{node}")) == 3
        # a worker shows its instance before it goes back to the idle list
        pool = manager._node.reconciler.lifecycle._threads  # type: ignore[union-attr]
        wait_until(lambda: len(pool._idle) == 3, 5, message="the workers did not all go idle")
        started.clear()
        cluster.configs = []
        manager.refresh()
        wait_until(lambda: not manager.instances and out.is_set(), 10)
        assert all_in.is_set(), f"the disconnects did not run at once: {inside}"
        assert inside == [f"dim-stop-{node}"] * 3
        assert [n for n in started if node in n] == []
        # never the other way round: a create leaves the stops' idle threads to them (at
        # the thread limit, a stop without a thread lets its claim lapse; a create waits)
        assert len(_threads(f"dim-stop-{node}")) == 3
        cluster.configs = [{"id": 3}]
        manager.refresh()
        wait_until(lambda: set(manager.instances) == {3}, 10)
        assert [n for n in started if node in n] == [f"dim-worker-{node}"]
        assert len(_threads(f"dim-stop-{node}")) == 3
    finally:
        cluster.stop()
