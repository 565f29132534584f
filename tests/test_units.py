"""Pure logic without Redis: settings, config validation, message schema, user calls."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from dim import CallTimeout, ConfigError, MessageError, Settings
from dim.configs import decode as decode_config
from dim.configs import normalize
from dim.keys import check_service
from dim.messages import MAX_MESSAGE_BYTES, Kind, Message, decode
from dim.testing import wait_until
from dim.usercode import Runners, call_with_timeout


def test_settings_defaults_match_the_design() -> None:
    """Defaults are the documented ones."""
    s = Settings()
    assert (s.heartbeat_interval, s.node_ttl, s.leader_ttl) == (1.0, 5.0, 5.0)
    assert (s.healthcheck_interval, s.healthcheck_timeout, s.config_interval) == (10, 5, 10)
    assert (s.create_attempts, s.create_timeout, s.disconnect_timeout) == (3, 10, 5)
    assert (s.lease, s.create_lease, s.reset_window) == (10.0, 17.25, 17.25)
    assert s.renew_deadline == 3.75  # node_ttl minus max(heartbeat, node_ttl / 4)


@pytest.mark.parametrize(
    ("changes", "name"),
    [
        ({"heartbeat_interval": -1}, "heartbeat_interval"),
        ({"heartbeat_interval": 0}, "heartbeat_interval"),
        ({"node_ttl": float("nan")}, "node_ttl"),
        ({"node_ttl": "5"}, "node_ttl"),
        ({"node_ttl": 2.0}, "node_ttl"),  # not above twice the heartbeat
        ({"leader_ttl": 1.5}, "leader_ttl"),
        ({"create_attempts": 0}, "create_attempts"),
        ({"create_attempts": 2.5}, "create_attempts"),
        ({"create_attempts": True}, "create_attempts"),
        ({"create_backoff": 5, "create_backoff_max": 1}, "create_backoff_max"),
        ({"max_workers": 0}, "max_workers"),
    ],
)
def test_invalid_settings_name_the_setting(changes: dict[str, Any], name: str) -> None:
    """A bad setting raises ConfigError (also a ValueError) whose message names it."""
    with pytest.raises(ConfigError, match=name) as info:
        Settings(**changes)
    assert isinstance(info.value, ValueError)


def test_settings_are_frozen() -> None:
    """Settings cannot be changed in place; replace() validates the copy."""
    s = Settings()
    with pytest.raises(AttributeError):
        s.node_ttl = 1  # type: ignore[misc]
    assert s.replace(node_ttl=7).node_ttl == 7
    with pytest.raises(ConfigError, match="node_ttl"):
        s.replace(node_ttl=1)


def test_configs_accept_mappings_and_bare_ids() -> None:
    """Mappings with an id and bare ints/strs are configs; the canonical form is stable."""
    out = normalize([{"id": 1, "b": 2, "a": 1}, "x", 7])
    assert list(out) == ["1", "x", "7"]
    assert out["1"].json == '[1,{"a":1,"b":2,"id":1}]'
    assert out["x"].id == "x" and out["7"].id == 7
    assert normalize([{"id": 1, "a": 1, "b": 2}])["1"].json == out["1"].json


def test_configs_custom_key() -> None:
    """key= reads the id from each config."""
    out = normalize([{"name": "a"}, {"name": "b"}], key=lambda c: c["name"])
    assert [c.id for c in out.values()] == ["a", "b"]


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (None, "NoneType"),
        ({"id": 1}, "dict"),
        ("abc", "str"),
        ([{"id": 1}, {"id": 1}], "duplicate config id 1"),
        ([1, "1"], "duplicate config id '1'"),
        ([{"name": "x"}], "no 'id'"),
        ([{"id": 1.5}], "1.5"),
        ([{"id": True}], "True"),
        ([{"id": None}], "None"),
        ([{"id": ""}], "''"),
        ([{"id": "a\nb"}], "control"),
        ([3.0], "3.0"),
        ([{"id": 1, "f": object()}], "not JSON-serialisable"),
        ([{"id": 2, "f": float("nan")}], "config 2 is not JSON"),
    ],
)
def test_bad_configs_are_named(raw: Any, needle: str) -> None:
    """Every kind of bad get_config result raises ConfigError naming the bad value."""
    with pytest.raises(ConfigError) as info:
        normalize(raw)
    assert needle in str(info.value)


def test_key_function_errors_are_wrapped() -> None:
    """A key= that raises becomes a ConfigError naming the item."""
    with pytest.raises(ConfigError, match="key\\(\\) raised"):
        normalize([{"x": 1}], key=lambda c: c["id"])


def test_stored_config_decoding_rejects_foreign_data() -> None:
    """Data in the configs hash that dim did not write is ignored, not trusted."""
    assert decode_config("1", '[1,{"id":1}]') is not None
    for text in ["not json", '{"id":1}', "[1]", '[2,{"id":2}]', "[true,1]", "[[1],1]"]:
        assert decode_config("1", text) is None


def test_service_names_are_checked() -> None:
    """Service names with spaces, braces or nothing at all are refused."""
    assert check_service("web.eu-1_a") == "web.eu-1_a"
    for bad in ["", "a b", "a{b}", "x" * 101, None, 3]:
        with pytest.raises(ConfigError):
            check_service(bad)


def test_messages_round_trip() -> None:
    """A message decodes to what was encoded."""
    message = Message(Kind.ASSIGNED, "n1", version=4, epoch=9, ckeys=("c",))
    assert decode(message.encode()) == message
    assert decode(Message(Kind.LEFT, "n2").encode()) == Message(Kind.LEFT, "n2")
    assert decode(b'{"k":"failed","n":"n3","c":"7"}').ckeys == ("7",)  # a single key


def test_released_hint_names_claims_only_when_they_fit() -> None:
    """A release hint names its claims, or none (everyone retries) when they do not fit."""
    few = Message.released("n1", ["1", "2", "3"])
    assert decode(few.encode()).ckeys == ("1", "2", "3")
    many = Message.released("n1", [str(i) for i in range(1000)])
    assert many.ckeys == ()
    assert decode(many.encode()).kind is Kind.RELEASED


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[1,2]",
        b'{"k":"assigned"}',
        b'{"k":"nope","n":"x"}',
        b'{"k":"left","n":""}',
        b'{"k":"left","n":"x","v":-1}',
        b'{"k":"left","n":"x","v":"3"}',
        b'{"k":"left","n":"x","e":true}',
        b'{"k":"left","n":"x","zz":1}',
        b'{"k":"left","n":"x","c":5}',
        b'{"k":"left","n":"' + b"x" * MAX_MESSAGE_BYTES + b'"}',
        12,
    ],
)
def test_malformed_messages_are_rejected(payload: Any) -> None:
    """Malformed, oversized or unknown messages raise MessageError."""
    with pytest.raises(MessageError):
        decode(payload)


def test_call_with_timeout_returns_raises_and_abandons() -> None:
    """A user call returns its value, re-raises its error, or times out; late results go
    to on_late."""
    assert call_with_timeout(lambda x: x + 1, 1, 1.0, "t") == 2
    with pytest.raises(ZeroDivisionError):
        call_with_timeout(lambda x: 1 / x, 0, 1.0, "t")
    release = threading.Event()
    late: list[Any] = []
    got_late = threading.Event()

    def slow(x: int) -> int:
        release.wait(5)
        return x

    def on_late(value: Any) -> None:
        late.append(value)
        got_late.set()

    with pytest.raises(CallTimeout, match=r"within 0\.05"):
        call_with_timeout(slow, 42, 0.05, "t", on_late=on_late)
    release.set()
    assert got_late.wait(5) and late == [42]


def test_runners_reuse_threads_abandon_hung_ones_and_close() -> None:
    """Consecutive calls run on one kept thread; a call that times out keeps its thread
    (abandoned, never reused); close() lets the idle threads exit."""
    runners = Runners("dim-test-runner", keep=2)
    idents = {runners.call(lambda _: threading.get_ident(), None, 1.0, "t") for _ in range(5)}
    assert len(idents) == 1
    release = threading.Event()
    with pytest.raises(CallTimeout):
        runners.call(lambda _: (release.wait(5), threading.get_ident())[1], None, 0.05, "t")
    # the hung call holds the kept thread, so the next call gets another one
    other = runners.call(lambda _: threading.get_ident(), None, 1.0, "t")
    assert other not in idents
    release.set()
    runners.close()
    wait_until(
        lambda: not [t for t in threading.enumerate() if t.name == "dim-test-runner"],
        5,
        message="runner threads did not exit after close()",
    )


def test_a_start_interrupted_while_its_thread_starts_runs_the_call_and_leaks_no_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A signal handler may raise in the caller (stop() on the main thread) while
    ``Thread.start`` waits for the new thread: the call still runs on that thread, and
    the thread exits once the pool closes (it does not wait for a call forever)."""
    runners = Runners("dim-test-interrupted", keep=1)
    ran = threading.Event()
    start = threading.Thread.start

    def interrupted(thread: threading.Thread) -> None:
        start(thread)
        raise SystemExit("a signal, as start() returns")

    monkeypatch.setattr(threading.Thread, "start", interrupted)
    with pytest.raises(SystemExit):
        runners.start(lambda _: ran.set(), None)
    monkeypatch.undo()
    assert ran.wait(5), "the call was lost with the interrupted start"
    runners.close()
    wait_until(
        lambda: not [t for t in threading.enumerate() if t.name == "dim-test-interrupted"],
        5,
        message="the thread of the interrupted start did not exit after close()",
    )


def test_runners_share_idle_threads_one_way_by_kind() -> None:
    """Calls of another kind (``name``) take an idle thread of the pool's kind only when
    they ``borrow``; the pool's kind never takes theirs. Each kind keeps at most ``keep``
    idle threads, counted by kind (a call that renames its thread changes nothing), and a
    borrowed thread its kind has no room for goes back to the pool's kind."""
    runners = Runners("dim-test-worker", keep=1)

    def idle() -> list[tuple[int | None, str]]:
        # (a call's result comes just before its thread is idle again: wait for it)
        wait_until(lambda: len(runners._idle) == 2, 5, message="the threads are not idle")
        return sorted((thread.ident, kind) for _inbox, thread, kind in runners._idle)

    def ident(_: object) -> int:
        return threading.get_ident()

    def renaming(_: object) -> int:
        threading.current_thread().name = "user-renamed"
        return threading.get_ident()

    try:
        worker = runners.call(ident, None, 1.0, "t")
        # a stop that does not borrow starts a thread of its own
        stop = runners.start(ident, None, name="dim-test-stop").result(1.0, "t")
        assert stop != worker
        assert idle() == sorted([(worker, "dim-test-worker"), (stop, "dim-test-stop")])
        # a stop that borrows takes its own kind's thread first, then any
        calls = [runners.start(renaming, None, name="dim-test-stop", borrow=True)]
        calls.append(runners.start(renaming, None, name="dim-test-stop", borrow=True))
        assert {call.result(1.0, "t") for call in calls} == {stop, worker}
        # one went back to the stop kind (keep=1), the other to the pool's own kind
        kinds = idle()
        assert sorted(kind for _ident, kind in kinds) == ["dim-test-stop", "dim-test-worker"]
        # a create takes the pool's kind only, and renaming threads grows nothing
        for _ in range(5):
            assert runners.call(renaming, None, 1.0, "t") in {stop, worker}
            assert sorted(kind for _ident, kind in idle()) == ["dim-test-stop", "dim-test-worker"]
    finally:
        runners.close()


# -- the node's knowledge of the server (dim.era) and the monotonic timer ---------------


def _header(status: str = "ok", now_ms: int = 1_000, fence: int = 5, reset_ms: int = 0) -> Any:
    from dim.era import Header

    return Header(status, now_ms, fence, reset_ms, "lost 1" if reset_ms else "")


def test_era_context_says_what_the_node_knows() -> None:
    """The context carries the highest fence value seen, the estimated server time, the
    lateness bound and the window; no estimate before the first reply."""
    from dim.era import Era

    now = [10.0]
    era = Era(lambda: now[0], max_delay=0.6, window=2.5)
    assert era.context() == "0 0 600 0 2500"
    era.observe(_header(now_ms=50_000, fence=42), sent=10.0, received=10.0)
    now[0] = 11.5
    assert era.context() == "42 51500 600 0 2500"
    era.note(40)
    assert era.seen == 42  # only grows


def test_era_tells_a_clock_step_from_a_late_request() -> None:
    """A reply that names a server time further ahead of the estimate than the estimate's
    uncertainty means the server's clock stepped forward, even when the request was
    accepted (a step shorter than the lateness bound); a request that was merely late
    does not."""
    from dim.era import Era

    era = Era(lambda: 0.0, max_delay=1.0, window=2.0, tolerance=0.05)
    era.observe(_header(now_ms=10_000), sent=0.0, received=0.01)
    # refused as late, but it took long: the request was late, not the clock
    era.observe(_header("stale", now_ms=11_000), sent=0.1, received=1.0)
    assert not era.jumped
    era.observe(_header(now_ms=11_095), sent=1.09, received=1.1)
    assert not era.jumped
    # accepted, back within 10 ms, yet 400 ms ahead of what the clock can explain
    era.observe(_header(now_ms=11_600), sent=1.19, received=1.2)
    assert era.jumped
    era.observe(_header(now_ms=11_610), sent=1.2, received=1.21)
    assert era.jumped  # not said yet: the next request says so
    era.observe(_header(now_ms=11_710), sent=1.3, received=1.31, said_jump=True)
    assert not era.jumped  # said, in a request that was accepted


def test_era_does_not_take_a_stall_of_its_own_for_a_clock_step() -> None:
    """A node that stalled while a reply sat unread (a GC pause of 3 s) underestimates the
    server's time by the stall; the next, quick reply is not taken for a step, because
    the stalled reply's round trip counts as uncertainty."""
    from dim.era import Era

    era = Era(lambda: 0.0, max_delay=1.0, window=2.0, tolerance=0.05)
    era.observe(_header(now_ms=10_000), sent=0.0, received=0.01)
    # computed at server 10 100 (t = 0.1), read at t = 3.1
    era.observe(_header(now_ms=10_100), sent=0.1, received=3.1)
    era.observe(_header("stale", now_ms=13_200), sent=3.19, received=3.2)
    assert not era.jumped
    # once a quick reply re-anchors the estimate, a real step shows again
    era.observe(_header(now_ms=13_300), sent=3.29, received=3.3)
    era.observe(_header(now_ms=13_900), sent=3.39, received=3.4)
    assert era.jumped


def test_era_follows_the_reset_window() -> None:
    """A reply naming a reset window makes the node wait until it ends; a later reply
    without one ends it."""
    from dim.era import Era

    now = [0.0]
    era = Era(lambda: now[0], max_delay=None, window=2.0)
    era.observe(_header(reset_ms=1500), sent=0.0, received=0.01)
    assert era.resetting() and era.reset_until == 1.5 and era.reset_id == "lost 1"
    now[0] = 1.6
    assert not era.resetting()
    era.observe(_header(reset_ms=1500), sent=1.6, received=1.61)
    era.observe(_header(), sent=1.7, received=1.71)
    assert not era.resetting()
    assert era.reset_id == "lost 1"  # remembered: the leader knows it has reloaded for it
    assert era.context().split()[2] == "0"  # no lateness check without a socket timeout


def test_every_runs_on_the_monotonic_clock_only() -> None:
    """The timer is due one interval after it last ran, whatever the wall clock does, and
    a late run causes no burst of catch-up runs."""
    from dim.loop import Every

    now = [100.0]
    every = Every(10.0, lambda: now[0])
    assert not every.due() and every.wait() == 10.0
    now[0] = 135.0  # three intervals late
    assert every.due()
    every.ran()
    assert not every.due() and every.wait() == 10.0


def test_parse_health_refuses_digits_int_cannot_read() -> None:
    """A foreign or damaged health field ("²" is a digit to str.isdigit, not to int)
    reads as nothing, instead of raising in the leader's count or in dim status."""
    from dim.protocol import parse_health

    assert parse_health("3 1") == (3, 1)
    assert parse_health("\u00b2 0") == (0, 0)
    assert parse_health("\u0663 0") == (0, 0)
    assert parse_health(None) == (0, 0)


def test_uwsgi_options_read_as_uwsgi_means_them() -> None:
    """uWSGI option values come as str or bytes, alone or as a list (given twice), in
    any case: 'false' in any of these forms is off."""
    from dim.runtime import _option

    for off in ([b"false"], b"False", "OFF", [b"1", b"0"], "", None):
        assert not _option({"enable-threads": off}, "enable-threads"), off
    for on in (True, b"true", [b"0", b"1"], "4", "Yes"):
        assert _option({"threads": on}, "threads"), on
    assert _option({b"lazy-apps": b"1"}, "lazy-apps")
