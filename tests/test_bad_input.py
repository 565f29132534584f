"""Bad input from users and foreign data in Redis: clear errors, nothing lost."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest
import redis

from dim import ConfigError, EventType, Manager, RedisUnavailableError
from dim.keys import Keys
from dim.testing import free_port, wait_until

from .helpers import FAST, Cluster, Quiet, RaiseOnceOn, comes_true


def test_constructor_rejects_bad_arguments(redis_url: str) -> None:
    """Misuse at construction fails fast with a message naming the bad value."""
    ok: dict[str, Any] = {"get_config": list, "create": object, "redis": redis_url, "service": "x"}
    cases = [
        ({"get_config": 5}, "get_config must be callable, got 5"),
        ({"create": None}, "create must be callable"),
        ({"healthcheck": "yes"}, "healthcheck must be callable, got 'yes'"),
        ({"disconnect": 1}, "disconnect must be callable"),
        (
            {"redis": 6379},
            "redis must be a URL, a redis.Redis or a redis.cluster.RedisCluster client, got 6379",
        ),
        ({"redis": "http://h:1"}, "http://h:1"),
        ({"service": "a b"}, "'a b'"),
        ({"service": None}, "service is required: it names the cluster this process joins"),
        ({"settings": {"node_ttl": 1}}, "settings must be a dim.Settings"),
        ({"weight": 0}, "weight must be a positive number, got 0"),
        ({"weight": float("inf")}, "inf"),
    ]
    for change, needle in cases:
        with pytest.raises(ConfigError) as info:
            Manager(**{**ok, **change})
        assert needle in str(info.value), change


def test_unreachable_redis_fails_start_within_the_timeout() -> None:
    """start() against a closed port raises RedisUnavailableError after connect_timeout."""
    port = free_port()
    settings = FAST.replace(connect_timeout=0.5)
    manager = Manager(
        list, object, redis=f"redis://:secret@127.0.0.1:{port}/0", service="x", settings=settings
    )
    began = time.monotonic()
    with pytest.raises(RedisUnavailableError) as info:
        manager.start()
    assert time.monotonic() - began < 5
    assert f"127.0.0.1:{port}" in str(info.value) and "secret" not in str(info.value)
    assert manager.node_id is None


def test_wrong_password_is_a_clear_error(redis_factory: Any) -> None:
    """A refused login raises RedisUnavailableError at once, saying so."""
    server = redis_factory(password="right")
    url = server.url.replace("redis://", "redis://:wrong@")
    manager = Manager(list, object, redis=url, service="x", settings=FAST)
    with pytest.raises(RedisUnavailableError, match=r"refused the login"):
        manager.start()


def _events(manager: Manager, *types: EventType) -> list[Any]:
    seen: list[Any] = []
    manager.add_listener(seen.append, *types)
    return seen


@pytest.mark.parametrize(
    "bad",
    [
        RuntimeError("config service down"),
        "not a list",
        # one bad item: it keeps its last good version, the others stand
        [{"id": 1}, {"id": 2}, {"id": 2}],
        [{"id": 1}, {"id": 2, "x": {1, 2}}],
        [{"id": 1}, {"id": 2}, {"id": [1]}],
        None,
    ],
    ids=["raises", "non-list", "duplicate-ids", "not-json", "id-type", "none"],
)
def test_bad_get_config_keeps_the_last_good_config(redis_url: str, service: str, bad: Any) -> None:
    """A failing or bad get_config is reported and the running instances are kept."""
    state = {"value": [{"id": 1}, {"id": 2}]}

    def get_config() -> Any:
        if isinstance(state["value"], Exception):
            raise state["value"]
        return state["value"]

    cluster = Cluster(redis_url, service, [])
    manager = cluster.make()
    manager._get_config = get_config  # type: ignore[attr-defined]
    errors = _events(manager, EventType.CONFIG_ERROR)
    manager.start()
    cluster.managers.append(manager)
    try:
        assert manager.wait_until_stable(10)
        assert sorted(manager.instances) == [1, 2]
        state["value"] = bad
        manager.refresh()
        wait_until(lambda: errors, 5, message="no CONFIG_ERROR event")
        assert isinstance(errors[0].error, ConfigError)
        # another poll or two: still the same instances, nothing was disconnected
        wait_until(lambda: len(errors) >= 2, 5)
        assert sorted(manager.instances) == [1, 2]
        assert cluster.ledger.create_count() == 2
        assert all(iv.end is None for iv in cluster.ledger.intervals())
        state["value"] = [{"id": 1}, {"id": 3}]
        manager.refresh()
        wait_until(lambda: sorted(manager.instances) == [1, 3], 5)
    finally:
        cluster.stop()


def test_create_failures_are_retried_then_handed_over(redis_url: str, service: str) -> None:
    """create raising on one node is retried create_attempts times, then the config moves
    to another node, which runs it, with no change of membership needed."""
    attempts: dict[str, int] = {}
    bad_node: dict[str, str] = {}
    lock = threading.Lock()

    def create_hook(node: str, config: Any) -> None:
        if config["id"] != 0:
            return
        with lock:
            bad_node.setdefault("id", node)  # the first node to try config 0 always fails
            if node == bad_node["id"]:
                attempts[node] = attempts.get(node, 0) + 1
                raise ConnectionRefusedError("upstream refuses config 0 here")

    # both nodes join before there is any config, so no rebalance moves config 0 away
    # from the node that fails it while it is still retrying
    cluster = Cluster(redis_url, service, [], create=create_hook)
    failed: list[Any] = []
    try:
        for manager in (cluster.make(), cluster.make()):
            manager.add_listener(failed.append, EventType.INSTANCE_FAILED, EventType.CREATE_FAILED)
            manager.start()
            cluster.managers.append(manager)
        cluster.wait_settled()
        cluster.configs = [{"id": i} for i in range(4)]
        for manager in cluster.managers:
            if manager.is_leader:
                manager.refresh()
        cluster.wait_settled()
        bad = bad_node["id"]
        assert attempts[bad] == FAST.create_attempts
        assert sum(e.type is EventType.INSTANCE_FAILED for e in failed) == 1
        assert sum(e.type is EventType.CREATE_FAILED for e in failed) == FAST.create_attempts - 1
        runner = next(m for m in cluster.managers if 0 in m.instances)
        assert runner.node_id != bad
    finally:
        cluster.stop()


def test_create_returning_none_is_a_failure(redis_url: str, service: str) -> None:
    """create returning None counts as a failed attempt, reported with the config id."""
    manager = Manager(
        lambda: [5],
        lambda c: None,
        redis=redis_url,
        service=service,
        settings=FAST.replace(create_attempts=2),
    )
    failed = _events(manager, EventType.INSTANCE_FAILED)
    with manager:
        wait_until(lambda: failed, 10)
        assert "create returned None for config id 5" in str(failed[0].error)
        assert manager.instances == {}


def test_hanging_create_times_out_and_late_instance_is_disconnected(
    redis_url: str, service: str
) -> None:
    """A create that hangs past create_timeout fails; its late instance is disconnected."""
    release = threading.Event()
    disconnected: list[Any] = []
    calls = {"n": 0}

    def create(config: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            release.wait(10)
            return "late"
        return "fresh"

    manager = Manager(
        lambda: [1],
        create,
        disconnect=disconnected.append,
        redis=redis_url,
        service=service,
        settings=FAST.replace(create_timeout=0.2),
    )
    with manager:
        wait_until(lambda: manager.instances.get(1) == "fresh", 10)
        release.set()
        wait_until(lambda: "late" in disconnected, 5)
        assert manager.instances == {1: "fresh"}


def test_a_hanging_create_gives_its_worker_place_up(redis_url: str, service: str) -> None:
    """A create runs on its worker thread; once it overruns create_timeout the worker's
    place goes to the next create (one place here), while the hanging call still runs
    and the overrun config is tried again under a new token."""
    gate = threading.Event()
    tokens: dict[Any, list[Any]] = {0: [], 1: []}
    manager: Manager

    def create(config: Any) -> Any:
        lease = manager.lease(config)
        tokens[config].append(lease.token if lease else None)
        if config == 0 and len(tokens[0]) == 1:
            gate.wait(10)  # the first attempt hangs until the test ends
            return "late"
        return f"instance {config}"

    configs = [0]
    settings = FAST.replace(create_timeout=0.3, max_workers=1)
    manager = Manager(
        lambda: list(configs), create, redis=redis_url, service=service, settings=settings
    )
    try:
        manager.start()
        wait_until(lambda: tokens[0], 10, message="create was not called")
        configs.append(1)
        manager.refresh()
        wait_until(lambda: manager.instances.get(1) == "instance 1", 5)
        wait_until(lambda: manager.instances.get(0) == "instance 0", 5)
        assert not gate.is_set()  # the first attempt still hangs
        first, second = tokens[0]
        assert first is not None and second is not None and second > first
    finally:
        gate.set()
        manager.stop()


def test_a_create_that_always_hangs_fails_after_create_attempts(
    redis_url: str, service: str
) -> None:
    """Attempts that overrun count across the threads that make them: after
    create_attempts overruns the config is given up (INSTANCE_FAILED), each attempt
    reported once with its number, and create is not called again meanwhile."""
    gate = threading.Event()
    calls: list[Any] = []
    settings = FAST.replace(create_timeout=0.2, create_attempts=3, failure_cooldown=30.0)

    def create(config: Any) -> Any:
        calls.append(config)
        gate.wait(10)
        return "late"

    manager = Manager(lambda: [7], create, redis=redis_url, service=service, settings=settings)
    events: list[Any] = []
    manager.add_listener(events.append, EventType.CREATE_FAILED, EventType.INSTANCE_FAILED)
    try:
        manager.start()
        wait_until(
            lambda: any(e.type is EventType.INSTANCE_FAILED for e in events),
            10,
            message="the config was not given up",
        )
        failed = [e.data["attempt"] for e in events if e.type is EventType.CREATE_FAILED]
        assert failed == [1, 2]
        assert len(calls) == 3
        assert "did not return within 0.2 s" in str(events[-1].error)
    finally:
        gate.set()
        manager.stop()


class _RaiseOnLate(logging.Filter):
    """A log filter with a bug: it raises on one message (the late create's warning)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "returned after its timeout" in str(record.msg):
            raise RuntimeError("log filter bug")
        return True


def test_an_error_disposing_a_late_create_does_not_resume_the_old_task(
    redis_url: str, service: str
) -> None:
    """The thread of a create that overran hands its task to another thread at the
    deadline; whatever happens while it disposes of the late instance (here a log filter
    raises on its warning), it goes on with that task no more: no second create next to
    the resumed task's, no slot finished under the instance that runs."""
    gate = threading.Event()
    lock = threading.Lock()
    made: list[str] = []
    disconnected: list[str] = []

    def create(config: Any) -> Any:
        with lock:
            name = "late" if not made else f"fresh-{len(made)}"
            made.append(name)
        if name == "late":
            gate.wait(10)
        return name

    def disconnect(instance: Any) -> None:
        with lock:
            disconnected.append(instance)

    def live() -> list[str]:
        with lock:
            return [m for m in made if m not in disconnected]

    bad = _RaiseOnLate()
    logging.getLogger("dim.reconciler").addFilter(bad)
    manager = Manager(
        lambda: [1],
        create,
        disconnect=disconnect,
        redis=redis_url,
        service=service,
        settings=FAST.replace(create_timeout=0.3),
    )
    try:
        manager.start()
        wait_until(lambda: manager.instances.get(1) == "fresh-1", 10)
        gate.set()  # the overrun call returns now, long after its deadline
        # (the bug this guards: the old thread went on with the task, created again,
        # finished the slot that ran fresh-1 under its claim, and the config was
        # claimed and created anew while fresh-1 still ran)
        try:
            wait_until(lambda: len(made) >= 4 and 1 in manager.instances, 3)
        except TimeoutError:
            pass
        during = (dict(manager.instances), live())
    finally:
        gate.set()
        manager.stop()
        logging.getLogger("dim.reconciler").removeFilter(bad)
    assert made == ["late", "fresh-1"] and live() == [], (
        f"made {made}; while running: instances {during[0]}, live {during[1]}; "
        f"left running after stop(): {live()}"
    )


def test_an_error_logging_a_give_up_does_not_strand_the_slot_in_creating(
    redis_url: str, service: str
) -> None:
    """A create that keeps failing is given up and the config claimed again after
    failure_cooldown. A log filter that raises once, on the give-up line, must not leave
    the slot CREATING with its claim renewed for good (the config would run nowhere,
    and no other node may claim it)."""
    calls: list[Any] = []
    failing = threading.Event()
    failing.set()

    def create(config: Any) -> Any:
        calls.append(config)
        if failing.is_set():
            raise ValueError("cannot create yet")
        return f"instance {config}"

    bad = RaiseOnceOn("gives up creating")
    logging.getLogger("dim.reconciler").addFilter(bad)
    settings = FAST.replace(create_attempts=2, failure_cooldown=0.5)
    manager = Manager(lambda: [5], create, redis=redis_url, service=service, settings=settings)
    try:
        manager.start()
        wait_until(lambda: bad.raised, 10, message="the config was never given up")
        failing.clear()  # the next claim's create succeeds
        ran = comes_true(lambda: manager.instances.get(5) == "instance 5", 10)
        assert ran, f"config 5 runs nowhere; create called {len(calls)} times"
    finally:
        logging.getLogger("dim.reconciler").removeFilter(bad)
        manager.stop()


class _BrokenFilter(logging.Filter):
    """A handler's filter with a bug, while ``broken`` is set: it raises on the give-up
    line and on every record with a traceback (``log.exception``)."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = threading.Event()
        self.broken.set()
        self.raised: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if self.broken.is_set() and (
            "gives up creating" in str(record.msg) or record.exc_info is not None
        ):
            self.raised.append(str(record.msg))
            raise RuntimeError("log filter bug")
        return True


def test_a_task_that_raises_past_its_guard_gives_its_worker_place_back(
    redis_url: str, service: str
) -> None:
    """However a create task ends, even by an exception its guard could not log (a
    broken log filter), its worker place is free again: with max_workers=1, config 2
    is still created once the filter works again."""
    broken = _BrokenFilter()
    handler = Quiet()
    handler.addFilter(broken)
    logging.getLogger("dim").addHandler(handler)
    configs = [5]

    def create(config: Any) -> Any:
        if config == 5:
            raise ValueError("config 5 cannot be created")
        return f"instance {config}"

    settings = FAST.replace(create_attempts=2, failure_cooldown=30.0, max_workers=1)
    manager = Manager(
        lambda: list(configs), create, redis=redis_url, service=service, settings=settings
    )
    try:
        manager.start()
        wait_until(
            lambda: any("task" in m and "raised" in m for m in broken.raised),
            10,
            message=f"no task raised past its guard: {broken.raised}",
        )
        broken.broken.clear()  # the filter works again
        configs.append(2)
        manager.refresh()
        created = comes_true(lambda: manager.instances.get(2) == "instance 2", 10)
        assert created, f"config 2 was never created; the filter raised on {broken.raised}"
    finally:
        broken.broken.clear()
        logging.getLogger("dim").removeHandler(handler)
        manager.stop()


def test_an_error_logging_a_transition_error_does_not_strand_the_slot(
    redis_url: str, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in dim (an impossible transition, injected here) lets the creating slot go,
    so the config is claimed anew, before anything is logged: a log filter that raises
    on that line does not strand the slot in CREATING with its claim renewed for good."""
    from dim import slots

    real = slots.Slot.created
    bugs = [1]

    def created(self: Any, instance: Any) -> None:
        if bugs:
            bugs.pop()
            raise slots.TransitionError("injected dim bug")
        real(self, instance)

    monkeypatch.setattr(slots.Slot, "created", created)
    bad = RaiseOnceOn("letting the slot go")
    logging.getLogger("dim.reconciler").addFilter(bad)
    manager = Manager(
        lambda: [3], lambda c: f"instance {c}", redis=redis_url, service=service, settings=FAST
    )
    try:
        manager.start()
        wait_until(lambda: bad.raised, 10, message="the bug was never hit")
        ran = comes_true(lambda: manager.instances.get(3) == "instance 3", 10)
        assert ran, f"config 3 runs nowhere: {manager.status().local}"
    finally:
        logging.getLogger("dim.reconciler").removeFilter(bad)
        manager.stop()


def test_failing_healthcheck_recreates_the_instance(redis_url: str, service: str) -> None:
    """An instance whose healthcheck raises is disconnected and created again."""
    cluster = Cluster(redis_url, service, [{"id": 1}], healthcheck=_check_flag)
    (m,) = cluster.add(1)
    try:
        cluster.wait_settled()
        first = m.instances[1]
        first.healthy = False
        wait_until(lambda: m.instances.get(1) not in (None, first), 10)
        assert first.closed
        assert cluster.ledger.overlaps() == []
    finally:
        cluster.stop()


def _check_flag(instance: Any) -> None:
    if not instance.healthy:
        raise RuntimeError("ping failed")


def test_hanging_healthcheck_counts_as_unhealthy(redis_url: str, service: str) -> None:
    """A healthcheck that never returns is cut off by healthcheck_timeout and the
    instance is recreated; the health loop keeps running."""
    hang = threading.Event()
    stuck = threading.Event()

    def healthcheck(instance: Any) -> bool:
        if hang.is_set() and instance.get("gen") == 1:
            stuck.wait(30)
        return True

    gens = {"n": 0}

    def create(config: Any) -> dict[str, int]:
        gens["n"] += 1
        return {"gen": gens["n"]}

    unhealthy: list[Any] = []
    settings = FAST.replace(healthcheck_timeout=0.1)
    manager = Manager(
        lambda: [1],
        create,
        healthcheck=healthcheck,
        redis=redis_url,
        service=service,
        settings=settings,
    )
    manager.add_listener(unhealthy.append, EventType.INSTANCE_UNHEALTHY)
    try:
        with manager:
            assert manager.wait_until_stable(10)
            hang.set()
            wait_until(lambda: manager.instances.get(1, {}).get("gen", 0) >= 2, 10)
            # listeners hear events on a thread of their own: the event may come after
            wait_until(lambda: unhealthy, 5, message="no INSTANCE_UNHEALTHY event")
            assert isinstance(unhealthy[0].error, TimeoutError)
    finally:
        stuck.set()


def test_disconnect_raising_or_hanging_still_releases(
    redis_url: str, service: str, redis_client: redis.Redis
) -> None:
    """disconnect that raises or hangs is bounded; the claim is released and stop ends."""
    stuck = threading.Event()

    def disconnect(instance: Any) -> None:
        if instance == 1:
            raise OSError("socket already closed")
        stuck.wait(30)

    manager = Manager(
        lambda: [1, 2],
        lambda c: c,
        disconnect=disconnect,
        redis=redis_url,
        service=service,
        settings=FAST.replace(disconnect_timeout=0.2),
    )
    try:
        manager.start()
        assert manager.wait_until_stable(10)
        began = time.monotonic()
        manager.stop()
        assert time.monotonic() - began < 3
        assert redis_client.keys(Keys(service).prefix + "claim:*") == []
    finally:
        stuck.set()


def test_foreign_data_and_bad_messages_are_ignored(
    redis_url: str, service: str, redis_client: redis.Redis
) -> None:
    """Garbage in dim's keys and channel is logged and ignored; the cluster keeps working."""
    keys = Keys(service)
    manager = Manager(lambda: [1, 2], lambda c: c, redis=redis_url, service=service, settings=FAST)
    with manager:
        assert manager.wait_until_stable(10)
        node = manager.node_id or ""
        redis_client.hset(keys.configs, "zzz", "{not json")
        redis_client.sadd(keys.desired(node), "zzz", "ghost")
        redis_client.zadd(keys.nodes, {"intruder": 1})
        redis_client.hset(keys.failures, "garbage", "x")
        redis_client.incr(keys.version)
        for payload in [
            b"\x00\xff",
            b"{}",
            b'{"k":"assigned","n":"x","v":"NaN"}',
            b'{"k":"left","n":"' + b"x" * 5000 + b'"}',
            b"[]" * 1000,
        ]:
            redis_client.publish(keys.events, payload)
        listener = manager._node.listener  # type: ignore[union-attr]
        wait_until(lambda: listener.dropped >= 5, 5)
        wait_until(lambda: manager.wait_until_stable(0), 5)
        assert sorted(manager.instances) == [1, 2]
        assert all(t.is_alive() for t in _dim_threads(node))


def _dim_threads(node_id: str) -> list[threading.Thread]:
    return [
        t
        for t in threading.enumerate()
        if t.name.endswith(node_id)
        and t.name.split("-")[1]
        in ("heartbeat", "fence", "reconciler", "leader", "listener", "events")
    ]
