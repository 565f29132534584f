"""User callbacks that misbehave (issue #10): BaseExceptions that are not Exceptions, a
get_config that hangs, one bad item in get_config's list, long ids, and a displaced
static node that stops after its successor joined.

Each test states the behaviour it proves; none of them looks at dim's internals.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import attrs
import pytest

from dim import ConfigError, Event, EventType, Manager
from dim.testing import RedisServer, wait_until
from tools.chaos.proxy import ChaosProxy

from .helpers import FAST, ROOT, Cluster, Ledger, dim_env


class GreenletExit(BaseException):
    """Stands in for gevent's GreenletExit: a BaseException that is not an Exception."""


BASE_EXCEPTIONS = [asyncio.CancelledError, SystemExit, KeyboardInterrupt, GreenletExit]
BASE_IDS = ["CancelledError", "SystemExit", "KeyboardInterrupt", "GreenletExit"]

# the roles of the threads every started manager runs (thread name: dim-<role>-<node id>)
ROLES = ("heartbeat", "fence", "reconciler", "leader", "listener", "events")


def _events(manager: Manager, *types: EventType) -> list[Event]:
    seen: list[Event] = []
    manager.add_listener(seen.append, *types)
    return seen


def _dead_dim_threads(node_id: str) -> list[str]:
    """The roles of this node's dim threads that are no longer running."""
    alive = {t.name for t in threading.enumerate() if t.is_alive()}
    return [role for role in ROLES if f"dim-{role}-{node_id}" not in alive]


def _wait(predicate: Callable[[], Any], timeout: float, describe: Callable[[], str]) -> None:
    """wait_until, failing with a message built at the deadline (the state then)."""
    try:
        wait_until(predicate, timeout, interval=0.02)
    except TimeoutError:
        raise AssertionError(f"{describe()} (waited {timeout:g} s)") from None


def _holds(check: Callable[[], Optional[str]], seconds: float, what: str) -> None:
    """Fail if ``check`` reports a problem (a string) at any sample during ``seconds``."""
    end = time.monotonic() + seconds
    found: dict[str, str] = {}

    def over() -> bool:
        problem = check()
        if problem:
            found["problem"] = problem
            return True
        return time.monotonic() >= end

    wait_until(over, seconds + 30, interval=0.02)
    assert not found, f"{what}: {found.get('problem')}"


def _stop_all(managers: list[Manager]) -> None:
    for m in managers:
        try:
            m.stop()
        except Exception:  # a failing test must still stop the others
            pass


# -- 1. BaseExceptions that are not Exceptions ----------------------------------------


@pytest.mark.parametrize("exc_type", BASE_EXCEPTIONS, ids=BASE_IDS)
def test_create_raising_a_base_exception_once_is_retried(
    redis_url: str, service: str, exc_type: type[BaseException]
) -> None:
    """create raising a non-Exception BaseException once: the config still runs exactly
    once (retried or handed over) and its claim is held by the node that runs it."""
    lock = threading.Lock()
    raised: list[str] = []

    def create_hook(node: str, config: Any) -> None:
        with lock:
            if config["id"] == 0 and not raised:
                raised.append(node)
                raise exc_type()

    cluster = Cluster(redis_url, service, [{"id": i} for i in range(4)], create=create_hook)
    try:
        cluster.add(2)
        wait_until(lambda: raised, 10, message="create was never called for config 0")
        _wait(
            cluster.settled,
            10,
            lambda: (
                f"config 0 does not run after create raised {exc_type.__name__} on "
                f"{raised[0]}: placement {cluster.placement()}, config 0 claimed by "
                f"{cluster.managers[0].status().configs[0].claimed_by}"
            ),
        )
        assert cluster.ledger.overlaps() == []
        (runner,) = cluster.placement()[0]
        status = cluster.managers[0].status()
        assert status.configs[0].claimed_by == runner
        # one failed interval (closed) and exactly one running instance of config 0
        open_intervals = [iv for iv in cluster.ledger.intervals(0) if iv.end is None]
        assert [iv.node for iv in open_intervals] == [runner]
    finally:
        cluster.stop()


@pytest.mark.parametrize("exc_type", BASE_EXCEPTIONS, ids=BASE_IDS)
def test_get_config_raising_a_base_exception_keeps_the_leader_working(
    redis_url: str, service: str, exc_type: type[BaseException]
) -> None:
    """get_config raising a non-Exception BaseException on the leader is a CONFIG_ERROR:
    a later config change is still applied and no dim thread dies."""
    state: dict[str, Any] = {"configs": [1, 2], "raise": 0, "raised": 0}
    lock = threading.Lock()

    def get_config() -> list[Any]:
        with lock:
            if state["raise"]:
                state["raise"] -= 1
                state["raised"] += 1
                raise exc_type()
            return list(state["configs"])

    manager = Manager(
        get_config, lambda c: {"config": c}, redis=redis_url, service=service, settings=FAST
    )
    errors = _events(manager, EventType.CONFIG_ERROR)
    manager.start()
    try:
        assert manager.wait_until_stable(10)
        node_id = manager.node_id or ""
        with lock:
            state["raise"] = 2  # the next two calls raise
        manager.refresh()
        wait_until(lambda: state["raised"] >= 1, 10, message="get_config was not called again")
        with lock:
            state["configs"] = [1, 2, 3]
        manager.refresh()
        _wait(
            lambda: sorted(manager.instances) == [1, 2, 3],
            10,
            lambda: (
                f"config 3 was never started (dead dim threads: "
                f"{_dead_dim_threads(node_id)}, get_config raised {state['raised']} times)"
            ),
        )
        assert errors, "no CONFIG_ERROR event for the raising get_config"
        assert _dead_dim_threads(node_id) == []
    finally:
        manager.stop()


@pytest.mark.parametrize("exc_type", BASE_EXCEPTIONS, ids=BASE_IDS)
def test_healthcheck_raising_a_base_exception_is_unhealthy(
    redis_url: str, service: str, exc_type: type[BaseException]
) -> None:
    """healthcheck raising a non-Exception BaseException marks the instance unhealthy at
    once (not after healthcheck_timeout): it is recreated and the checks go on."""
    lock = threading.Lock()
    gens = {"n": 0}
    checks: dict[int, int] = {}
    armed = threading.Event()
    raised = threading.Event()

    def create(config: Any) -> dict[str, int]:
        with lock:
            gens["n"] += 1
            return {"gen": gens["n"]}

    def healthcheck(instance: dict[str, int]) -> bool:
        with lock:
            checks[instance["gen"]] = checks.get(instance["gen"], 0) + 1
            fire = armed.is_set() and instance["gen"] == 1 and not raised.is_set()
            if fire:
                raised.set()
        if fire:
            raise exc_type()
        return True

    # a long timeout: a check that raised must not be taken for one that hangs
    settings = FAST.replace(healthcheck_timeout=30.0)
    manager = Manager(
        lambda: [1],
        create,
        healthcheck=healthcheck,
        redis=redis_url,
        service=service,
        settings=settings,
    )
    unhealthy = _events(manager, EventType.INSTANCE_UNHEALTHY)
    manager.start()
    try:
        assert manager.wait_until_stable(10)
        wait_until(lambda: checks.get(1, 0) >= 1, 10, message="healthcheck never ran")
        armed.set()
        wait_until(raised.is_set, 10, message="healthcheck did not run again")
        wait_until(
            lambda: unhealthy,
            10,
            message="no INSTANCE_UNHEALTHY within 10 s of a healthcheck that raised",
        )
        assert unhealthy[0].config_id == 1 and unhealthy[0].error is not None
        wait_until(lambda: manager.instances.get(1, {}).get("gen", 0) >= 2, 10)
        gen = manager.instances[1]["gen"]
        _wait(
            lambda: checks.get(gen, 0) >= 2,
            10,
            lambda: f"the recreated instance (gen {gen}) is not checked: {checks}",
        )
    finally:
        manager.stop()


@pytest.mark.parametrize("exc_type", BASE_EXCEPTIONS, ids=BASE_IDS)
def test_disconnect_raising_a_base_exception_still_releases(
    redis_url: str, service: str, exc_type: type[BaseException]
) -> None:
    """disconnect raising a non-Exception BaseException still releases the claim: the
    config moves to a new node that joins, and to the other node when its owner stops."""
    ledger = Ledger()
    # a longer node_ttl: a claim that is released is told from one that merely lapsed
    settings = FAST.replace(node_ttl=2.0)

    def make() -> Manager:
        box: dict[str, Manager] = {}

        def create(config: Any) -> dict[str, Any]:
            node = box["m"].node_id or "?"
            return {"config": config, "node": node, "entry": ledger.open(node, config)}

        def disconnect(instance: dict[str, Any]) -> None:
            ledger.close(instance["entry"], instance["config"], instance["node"])
            raise exc_type()

        box["m"] = Manager(
            lambda: [1, 2, 3, 4],
            create,
            disconnect=disconnect,
            redis=redis_url,
            service=service,
            settings=settings,
        )
        return box["m"]

    a, b = make(), make()
    try:
        a.start()
        assert a.wait_until_stable(10)
        b.start()

        def balanced() -> bool:
            counts = sorted(len(m.instances) for m in (a, b))
            return counts == [2, 2] and a.wait_until_stable(0) and b.wait_until_stable(0)

        _wait(
            balanced,
            10,
            lambda: (
                f"configs did not move to the new node: a runs {sorted(a.instances)}, "
                f"b runs {sorted(b.instances)}, claims "
                f"{ {c: s.claimed_by for c, s in a.status().configs.items()} }"
            ),
        )
        assert ledger.overlaps() == []
        a_id = a.node_id
        a.stop()

        def a_claims() -> list[Any]:
            return [c for c, s in b.status().configs.items() if s.claimed_by == a_id]

        # stop() released the claims: they do not linger until node_ttl
        _wait(
            lambda: not a_claims(),
            1.0,
            lambda: f"the stopped node still holds claims {a_claims()} (not released)",
        )
        wait_until(
            lambda: sorted(b.instances) == [1, 2, 3, 4] and b.wait_until_stable(0),
            10,
            message="the stopped node's configs did not move to the other node",
        )
        assert ledger.overlaps() == []
    finally:
        _stop_all([a, b])


@pytest.mark.parametrize("exc_type", BASE_EXCEPTIONS, ids=BASE_IDS)
def test_listener_raising_a_base_exception_does_not_stop_delivery(
    redis_url: str, service: str, exc_type: type[BaseException]
) -> None:
    """A listener raising a non-Exception BaseException is ignored: later events are still
    delivered to every listener."""
    state = {"configs": [1]}
    manager = Manager(
        lambda: list(state["configs"]),
        lambda c: {"config": c},
        redis=redis_url,
        service=service,
        settings=FAST,
    )
    created = _events(manager, EventType.INSTANCE_CREATED)
    bad_calls: list[Event] = []

    def bad_listener(event: Event) -> None:
        bad_calls.append(event)
        if len(bad_calls) == 1:
            raise exc_type()

    manager.add_listener(bad_listener, EventType.INSTANCE_CREATED)
    manager.start()
    try:
        assert manager.wait_until_stable(10)
        wait_until(lambda: bad_calls, 10, message="the listener was never called")
        state["configs"] = [1, 2]
        manager.refresh()
        wait_until(lambda: sorted(manager.instances) == [1, 2], 10)
        _wait(
            lambda: any(e.config_id == 2 for e in created),
            10,
            lambda: f"INSTANCE_CREATED for config 2 was never delivered: {created}",
        )
        wait_until(lambda: any(e.config_id == 2 for e in bad_calls), 10)
    finally:
        manager.stop()


# -- 2. a get_config that hangs -------------------------------------------------------


class HangingSource:
    """get_config that returns ``configs`` until :meth:`hang` is called, then blocks on
    every call until :meth:`release` (shared by every manager that uses it).

    It hangs only once its configs run: a new service's leader waits a node TTL before
    placing anything, and get_config is polled meanwhile."""

    def __init__(self, configs: list[Any]) -> None:
        self.configs = configs
        self.hanging = threading.Event()  # a call is blocked now
        self._armed = threading.Event()
        self._release = threading.Event()

    def __call__(self) -> list[Any]:
        if self._armed.is_set():
            self.hanging.set()
            self._release.wait(90)
        return list(self.configs)

    def hang(self) -> None:
        """Every later call blocks; returns once one does (the leader's next poll)."""
        self._armed.set()
        wait_until(self.hanging.is_set, 10, message="get_config was not called again")

    def release(self) -> None:
        self._release.set()


def test_stop_returns_while_get_config_hangs(redis_url: str, service: str) -> None:
    """stop() returns within disconnect_timeout + 3 s while the leader's get_config hangs."""
    source = HangingSource([1, 2])
    manager = Manager(
        source, lambda c: {"config": c}, redis=redis_url, service=service, settings=FAST
    )
    stopper: Optional[threading.Thread] = None
    try:
        manager.start()
        assert manager.wait_until_stable(10)
        source.hang()
        stopper = threading.Thread(target=manager.stop, name="test-stop", daemon=True)
        began = time.monotonic()
        stopper.start()
        stopper.join(FAST.disconnect_timeout + 3)
        assert not stopper.is_alive(), (
            f"stop() did not return within {time.monotonic() - began:.1f} s while get_config hangs"
        )
    finally:
        source.release()
        if stopper is not None:
            stopper.join(15)
        manager.stop()


def test_a_new_node_gets_its_share_while_get_config_hangs(redis_url: str, service: str) -> None:
    """While the leader's get_config hangs, a second manager still joins and gets a
    balanced share of the configs."""
    source = HangingSource([1, 2, 3, 4])

    def make() -> Manager:
        return Manager(
            source, lambda c: {"config": c}, redis=redis_url, service=service, settings=FAST
        )

    a, b = make(), make()
    try:
        a.start()
        assert a.wait_until_stable(10)
        source.hang()
        b.start()
        _wait(
            lambda: (
                sorted(len(m.instances) for m in (a, b)) == [2, 2]
                and a.wait_until_stable(0)
                and b.wait_until_stable(0)
            ),
            10,
            lambda: (
                f"no balanced share while get_config hangs: a runs "
                f"{sorted(a.instances)}, b runs {sorted(b.instances)}"
            ),
        )
    finally:
        source.release()
        _stop_all([a, b])


EXIT_SCRIPT = """
import json, sys, threading
from dim import Manager, Settings

url, service, settings = sys.argv[1], sys.argv[2], Settings(**json.loads(sys.argv[3]))
armed = threading.Event()
hanging = threading.Event()
never = threading.Event()

def get_config():
    if armed.is_set():
        hanging.set()
        never.wait()  # hangs for good once armed
    return [1, 2]

# module level, as in an application: the manager is still alive when main returns
manager = Manager(get_config, lambda c: {"config": c}, redis=url, service=service,
                  settings=settings)

def main():
    manager.start()
    if not manager.wait_until_stable(30):
        sys.exit("never stable")
    armed.set()
    if not hanging.wait(30):
        sys.exit("get_config was not called again")
    print("running", sorted(manager.instances), flush=True)
    # return without stop(): dim's exit hook stops the manager

main()
"""


def test_process_exits_while_get_config_hangs(redis_url: str, service: str, tmp_path: Path) -> None:
    """A process that returns from main without stop() while its leader's get_config
    hangs exits within disconnect_timeout + 3 s."""
    script = tmp_path / "hang.py"
    script.write_text(EXIT_SCRIPT)
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    settings = json.dumps(attrs.asdict(FAST))
    with out.open("w") as out_f, err.open("w") as err_f:
        proc = subprocess.Popen(
            [sys.executable, str(script), redis_url, service, settings],
            stdin=subprocess.DEVNULL,
            stdout=out_f,
            stderr=err_f,
            cwd=ROOT,
            env=dim_env(),
        )
    try:
        wait_until(
            lambda: "running" in out.read_text() or proc.poll() is not None,
            30,
            message="the process never ran its instances",
        )
        assert "running [1, 2]" in out.read_text(), err.read_text()[-2000:]
        began = time.monotonic()
        limit = FAST.disconnect_timeout + 3
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"the process did not exit within {limit:g} s of returning from main "
                f"(still running after {time.monotonic() - began:.1f} s)"
            )
        assert code == 0, err.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


# -- 3. one bad item in get_config's list --------------------------------------------


class NotJson:
    """Not JSON-serialisable (stands in for any object a config must not hold)."""


BAD_LISTS = [
    ([1, 2, 3, 4, {"no id": True}], ["no id"]),
    ([1, 2, 2, 3, 4], ["duplicate", "2"]),
    ([1, {"id": 2, "x": NotJson()}, 3, 4], ["JSON", "2"]),
]
BAD_IDS = ["no-id", "duplicate", "not-json"]


@pytest.mark.parametrize(("bad_list", "needles"), BAD_LISTS, ids=BAD_IDS)
def test_one_bad_item_does_not_freeze_the_list(
    redis_url: str, service: str, bad_list: list[Any], needles: list[str]
) -> None:
    """One bad item in get_config's list is reported (CONFIG_ERROR naming it) and skipped:
    a new good item in the same list starts and every running config keeps running."""
    state: dict[str, Any] = {"configs": [1, 2, 3]}
    manager = Manager(
        lambda: state["configs"],
        lambda c: {"config": c},
        redis=redis_url,
        service=service,
        settings=FAST,
    )
    errors = _events(manager, EventType.CONFIG_ERROR)
    manager.start()
    try:
        assert manager.wait_until_stable(10)
        before = dict(manager.instances)
        assert sorted(before) == [1, 2, 3]
        state["configs"] = bad_list
        manager.refresh()
        _wait(
            lambda: 4 in manager.instances,
            10,
            lambda: (
                f"the new good config 4 never started (runs {sorted(manager.instances)}, "
                f"distinct errors {sorted({str(e.error) for e in errors})})"
            ),
        )
        # listeners hear events on a thread of their own: the event may come after
        wait_until(lambda: errors, 5, message="no CONFIG_ERROR event")
        text = str(errors[0].error)
        assert isinstance(errors[0].error, ConfigError)
        assert all(n in text for n in needles), text
        assert manager.wait_until_stable(10)
        after = manager.instances
        assert sorted(after) == [1, 2, 3, 4]
        # nothing was recreated: the bad item's config keeps its last good version
        assert all(after[c] is before[c] for c in (1, 2, 3))
    finally:
        manager.stop()


# (the list, what must run, what must not run): of a duplicated id with no last good
# version, dim may run the first occurrence or neither
FIRST_START = [
    ([1, 2, {"no id": True}, 3], {1, 2, 3}, set()),
    ([1, 2, 2, 3], {1, 3}, set()),
    ([1, {"id": 2, "x": NotJson()}, 3], {1, 3}, {2}),
]


@pytest.mark.parametrize(("bad_list", "good", "bad"), FIRST_START, ids=BAD_IDS)
def test_first_start_with_one_bad_item_runs_the_good_ones(
    redis_url: str, service: str, bad_list: list[Any], good: set[int], bad: set[int]
) -> None:
    """On a first start, one bad item among good ones is reported and the good ones run."""
    manager = Manager(
        lambda: bad_list, lambda c: {"config": c}, redis=redis_url, service=service, settings=FAST
    )
    errors = _events(manager, EventType.CONFIG_ERROR)
    manager.start()
    try:
        _wait(
            lambda: good <= set(manager.instances),
            10,
            lambda: (
                f"the good configs never started (runs {sorted(manager.instances)}, "
                f"distinct errors {sorted({str(e.error) for e in errors})})"
            ),
        )
        wait_until(lambda: errors, 10, message="no CONFIG_ERROR event")
        assert manager.wait_until_stable(10)
        assert good <= set(manager.instances) <= {1, 2, 3} - bad
    finally:
        manager.stop()


# -- 4. long ids ---------------------------------------------------------------------


def test_config_with_a_long_url_id_runs(redis_url: str, service: str) -> None:
    """Configs whose ids are 1,000-character URLs run, each exactly once, also after
    half of them move to a second node (ids differing only at the end stay distinct)."""
    base = "https://example.com/feeds/" + "x" * 1000
    urls = [base[:999] + str(i) for i in range(4)]
    assert all(len(u) == 1000 for u in urls)
    cluster = Cluster(redis_url, service, [{"id": u, "url": u} for u in urls])
    try:
        a = cluster.make()
        errors = _events(a, EventType.CONFIG_ERROR)
        cluster.managers.append(a.start())
        _wait(
            lambda: sorted(a.instances) == urls,
            10,
            lambda: (
                f"configs with 1,000-character ids did not start: {len(a.instances)} run, "
                f"{len(errors)} CONFIG_ERROR events"
                + (f", the first: {str(errors[0].error)[:100]}..." if errors else "")
            ),
        )
        cluster.add(1)
        cluster.wait_settled(timeout=10)
        assert cluster.counts() == [2, 2]
        assert cluster.ledger.overlaps() == []
        status = a.status()
        assert sorted(status.configs) == urls
        assert all(s.settled for s in status.configs.values())
    finally:
        cluster.stop()


# -- 5. a displaced static node stops after its successor joined ----------------------


def test_displaced_static_node_stop_leaves_the_successor_alone(
    redis_server: RedisServer, redis_url: str, service: str
) -> None:
    """A static node whose session lapsed (cut off from Redis) and that stops after a
    successor took its name leaves the successor's membership, desired set and claims
    alone: the successor keeps running its share, and later changes to it."""
    state = {"configs": [1, 2, 3]}
    ledger = Ledger()

    def make(url: str, label: str) -> Manager:
        # the two share a node id: the ledger tells them apart by their label

        def create(config: Any) -> dict[str, Any]:
            return {"config": config, "entry": ledger.open(label, config)}

        def disconnect(instance: dict[str, Any]) -> None:
            ledger.close(instance["entry"], instance["config"], label)

        return Manager(
            lambda: list(state["configs"]),
            create,
            disconnect=disconnect,
            redis=url,
            service=service,
            settings=FAST,
            node_name="web-1",
        )

    proxy = ChaosProxy(redis_server.port)
    predecessor = make(proxy.url, "predecessor")
    successor = make(redis_url, "successor")
    observer = Manager(list, object, redis=redis_url, service=service, settings=FAST)
    managers = [predecessor, successor]
    try:
        predecessor.start()
        assert predecessor.wait_until_stable(10)
        proxy.stall()  # its heartbeats no longer reach Redis
        wait_until(
            lambda: not observer.status().nodes,
            10,
            message="the predecessor's membership did not lapse",
        )
        successor.start()  # the name is free again
        assert successor.node_id == "web-1"
        assert successor.wait_until_stable(10)
        wait_until(lambda: not predecessor.instances, 10, message="predecessor never fenced")
        before = dict(successor.instances)
        assert sorted(before) == [1, 2, 3]
        proxy.resume()
        predecessor.stop()

        def problem() -> Optional[str]:
            members = [n.node_id for n in successor.status().nodes]
            if "web-1" not in members:
                return f"the successor is no longer a member: {members}"
            now = successor.instances
            if sorted(now) != [1, 2, 3] or any(now[c] is not before[c] for c in now):
                return f"the successor's instances changed: {sorted(now)}"
            return None

        _holds(problem, 20 * FAST.heartbeat_interval, "after the predecessor stopped")
        # its desired set is intact: a new config is added to it, nothing else changes
        state["configs"] = [1, 2, 3, 4]
        successor.refresh()
        wait_until(lambda: 4 in successor.instances, 10, message="config 4 never started")
        assert successor.wait_until_stable(10)
        now = successor.instances
        assert sorted(now) == [1, 2, 3, 4], f"the successor lost its share: runs {sorted(now)}"
        assert all(now[c] is before[c] for c in (1, 2, 3))
        assert ledger.overlaps() == []
    finally:
        proxy.close()
        _stop_all(managers)
