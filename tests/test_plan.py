"""The leader's rules (:mod:`dim.plan`) without Redis, threads or a clock.

Each change set is applied to a model of what the leader-write script does to Redis
(:class:`Stored`), so the tests check what Redis would hold, not how the change is spelt.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import attrs
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dim import balance
from dim.change import Change
from dim.configs import Config, parse
from dim.plan import (
    NO_LIVE_NODE,
    WAITS_FOR_CAPACITY,
    Census,
    Members,
    Pacing,
    Plan,
    Wanted,
    Written,
    census,
    claims_to_read,
    differ,
    plan,
    repair,
    shares,
)


def configs(n: int, start: int = 0) -> dict[str, Config]:
    return dict(parse([{"id": i} for i in range(start, start + n)], None).configs)


@attrs.define
class Stored:
    """What the leader-write script leaves in Redis (scripts.LEADER_WRITE, modelled)."""

    assignment: dict[str, str] = attrs.field(factory=dict)
    desired: dict[str, set[str]] = attrs.field(factory=dict)
    configs: dict[str, str] = attrs.field(factory=dict)
    unplaced: dict[str, str] = attrs.field(factory=dict)

    def apply(self, change: Change) -> None:
        self.assignment.update(change.assign)
        for ckey in change.unassign:
            self.assignment.pop(ckey, None)
        self.configs.update(change.configs)
        for ckey in change.drop_configs:
            self.configs.pop(ckey, None)
        for node, ckeys in change.rem.items():
            self.desired.setdefault(node, set()).difference_update(ckeys)
        for node, ckeys in change.add.items():
            self.desired.setdefault(node, set()).update(ckeys)
        for node in change.drop_nodes:
            self.desired.pop(node, None)
        self.unplaced.update(change.unplaced)
        for ckey in change.placeable:
            self.unplaced.pop(ckey, None)

    def shares(self) -> dict[str, set[str]]:
        return {n: s for n, s in self.desired.items() if s}


def step(
    stored: Stored,
    wanted: Wanted,
    members: Members,
    written: Optional[Written] = None,
    holders: Optional[Mapping[str, tuple[str, int]]] = None,
    **kw: object,
) -> tuple[Plan, Written]:
    """Plan, apply the change to ``stored``, and return the leader's state after it."""
    written = written or Written()
    result = plan(wanted, members, written, holders or {}, **kw)  # type: ignore[arg-type]
    stored.apply(result.change)
    after = Written(
        assignment=result.assignment,
        configs={c: cfg.json for c, cfg in wanted.configs.items()},
        live=dict(members.live),
        unplaced=result.unplaced,
    )
    return result, after


def by_node(assignment: Mapping[str, str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for ckey, node in assignment.items():
        out.setdefault(node, set()).add(ckey)
    return out


def test_first_plan_places_everything_evenly_and_writes_every_share() -> None:
    stored = Stored()
    wanted = Wanted(configs(10))
    result, _ = step(stored, wanted, Members({"a": 1.0, "b": 1.0}))
    assert sorted(len(s) for s in by_node(result.assignment).values()) == [5, 5]
    assert stored.shares() == by_node(result.assignment)
    assert stored.configs == {c: cfg.json for c, cfg in wanted.configs.items()}
    assert (result.moved, result.placed) == (0, 10)


def test_a_join_moves_the_fewest_configs_and_shrinks_the_old_owner() -> None:
    stored = Stored()
    wanted = Wanted(configs(12))
    first, written = step(stored, wanted, Members({"a": 1.0}))
    result, _ = step(stored, wanted, Members({"a": 1.0, "b": 1.0, "c": 1.0}), written)
    assert sorted(len(s) for s in by_node(result.assignment).values()) == [4, 4, 4]
    assert result.moved == balance.moves(first.assignment, result.assignment) == 8
    assert stored.shares() == by_node(result.assignment)
    assert result.change.configs == {}  # the configs did not change: not written again


def test_a_dead_node_is_dropped_and_its_configs_placed_on_the_others() -> None:
    stored = Stored()
    wanted = Wanted(configs(9))
    _, written = step(stored, wanted, Members({"a": 1.0, "b": 1.0, "c": 1.0}))
    result, _ = step(stored, wanted, Members({"a": 1.0, "b": 1.0}, dead=["c"]), written)
    assert result.change.drop_nodes == ["c"]
    assert set(result.assignment.values()) == {"a", "b"}
    assert result.moved == 0 and result.placed == 3  # c ran nothing any more
    assert stored.shares() == by_node(result.assignment)


def test_a_new_leader_places_orphans_where_they_are_claimed() -> None:
    """The assignment names a node that is gone, but a live node holds the claim (the
    placement was lost, or the old leader's last write was): it stays where it runs."""
    wanted = Wanted(configs(4))
    cfg = sorted(wanted.configs)
    written = Written(assignment={c: "gone" for c in cfg})
    members = Members({"a": 1.0, "b": 1.0})
    assert claims_to_read(wanted, members, written, False, Pacing()) == list(wanted.configs)
    holders = {cfg[0]: ("b", 7), cfg[1]: ("b", 8), cfg[2]: ("a", 9)}
    result = plan(wanted, members, written, holders)
    assert result.assignment[cfg[0]] == result.assignment[cfg[1]] == "b"
    assert result.assignment[cfg[2]] == "a"
    assert result.moved == 0


def test_in_a_reset_window_only_configs_on_live_nodes_or_claimed_are_placed() -> None:
    """A config whose node is gone is placed only once a live node claims it back (nobody
    may take a new claim in the window, so placing it elsewhere would strand it)."""
    wanted = Wanted(configs(4))
    cfg = sorted(wanted.configs)
    written = Written(assignment={cfg[0]: "gone", cfg[1]: "gone", cfg[2]: "a", cfg[3]: "a"})
    members = Members({"a": 1.0, "b": 1.0})
    holders = {cfg[0]: ("b", 3)}  # only this one was claimed back so far
    result = plan(wanted, members, written, holders, grace=True)
    assert result.assignment == {cfg[0]: "b", cfg[2]: "a", cfg[3]: "a"}
    assert result.unplaced == {}  # waiting for claims is not "cannot be placed"


def test_a_static_node_in_its_grace_keeps_its_configs_and_gets_them_back() -> None:
    stored = Stored()
    wanted = Wanted(configs(6))
    _, written = step(stored, wanted, Members({"a": 1.0, "s": 1.0}))
    held = {c for c, n in written.assignment.items() if n == "s"}
    gone, written = step(stored, wanted, Members({"a": 1.0}, absent=frozenset({"s"})), written)
    assert {c for c, n in gone.assignment.items() if n == "s"} == held
    assert not gone.change.assign and "s" not in gone.change.rem
    assert gone.change.drop_nodes == ["s"]  # its membership and desired set go
    back, _ = step(stored, wanted, Members({"a": 1.0, "s": 1.0}), written)
    assert back.moved == 0 and {n: set(c) for n, c in back.change.add.items()} == {"s": held}
    assert stored.shares() == {"a": set(wanted.configs) - held, "s": held}


def test_failed_nodes_are_avoided_until_their_record_expires() -> None:
    wanted = Wanted(configs(1))
    (ckey,) = wanted.configs
    written = Written(assignment={ckey: "a"}, live={"a": 1.0, "b": 1.0})
    failures = {f"a {ckey}": 2_000}
    members = Members({"a": 1.0, "b": 1.0}, now_ms=1_000, failures=failures)
    assert plan(wanted, members, written, {}).assignment == {ckey: "b"}
    later = attrs.evolve(members, now_ms=2_000)
    result = plan(wanted, later, written, {})
    assert result.assignment == {ckey: "a"} and result.change.drop_failures == [f"a {ckey}"]


def test_why_a_config_has_no_place() -> None:
    wanted = Wanted(configs(3), required={}, priority={})
    cfg = sorted(wanted.configs)
    tagged = Wanted(wanted.configs, required={cfg[0]: frozenset({"gpu"})})
    members = Members({"a": 1.0}, capacity={"a": 1})
    result = plan(tagged, members, Written(), {})
    assert result.unplaced[cfg[0]] == "needs tags gpu"
    assert sorted(result.unplaced.values()).count(WAITS_FOR_CAPACITY) == 1
    assert len(result.assignment) == 1
    nowhere = plan(wanted, Members({}), Written(), {})
    assert nowhere.assignment == {} and nowhere.unplaced == {}  # no node: not reported
    assert NO_LIVE_NODE  # the reason a tagless config without a node gets elsewhere


def test_pacing_lets_limit_moves_go_at_a_time_until_they_arrive() -> None:
    stored = Stored()
    wanted = Wanted(configs(8))
    _, written = step(stored, wanted, Members({"a": 1.0}))
    members = Members({"a": 1.0, "b": 1.0})
    pacing = Pacing(limit=2)
    first, written = step(stored, wanted, members, written, pacing=pacing)
    assert first.moved == 2 and first.held_back == 2 and len(first.moving) == 2
    # nothing arrived yet: nothing more moves
    again = plan(wanted, members, written, {}, pacing=Pacing(2, True, first.moving))
    assert again.moved == 0 and not again.change and again.held_back == 2
    # both arrived (their target holds the claim): the next two go
    holders = {c: (n, 1) for c, n in first.moving.items()}
    assert set(
        claims_to_read(wanted, members, written, False, Pacing(2, True, first.moving))
    ) >= set(first.moving)
    second, _ = step(
        stored, wanted, members, written, holders, pacing=Pacing(2, True, first.moving)
    )
    assert second.moved == 2 and second.held_back == 0
    assert set(second.moving).isdisjoint(first.moving)
    assert sorted(len(s) for s in by_node(second.assignment).values()) == [4, 4]


def test_while_membership_is_not_quiet_only_configs_running_nowhere_move() -> None:
    stored = Stored()
    wanted = Wanted(configs(6))
    _, written = step(stored, wanted, Members({"a": 1.0, "b": 1.0}))
    on_b = {c for c, n in written.assignment.items() if n == "b"}
    members = Members({"a": 1.0, "c": 1.0, "d": 1.0}, dead=["b"])
    result, _ = step(stored, wanted, members, written, pacing=Pacing(quiet=False))
    # b's configs run nowhere: placed at once; a keeps all of its own for now
    assert result.held_back == 1  # a's 3 give 1 to c or d once the membership is quiet
    assert {c for c, n in result.assignment.items() if n == "a"} == set(wanted.configs) - on_b
    assert {result.assignment[c] for c in on_b} == {"c", "d"}
    assert (result.moved, result.placed) == (0, 3)


def test_a_leaving_leaders_configs_never_wait() -> None:
    stored = Stored()
    wanted = Wanted(configs(4))
    _, written = step(stored, wanted, Members({"a": 1.0, "b": 1.0}))
    members = Members({"b": 1.0}, holding=frozenset({"a"}))
    result, _ = step(
        stored, wanted, members, written, pacing=Pacing(limit=1, quiet=False), exclude="a"
    )
    assert set(result.assignment.values()) == {"b"} and result.held_back == 0
    assert stored.shares() == {"b": set(wanted.configs)}
    assert "a" not in result.change.drop_nodes  # it still runs them until they move


def fewest_moves(before: Mapping[str, str], live: list[str], total: int) -> int:
    """The fewest moves of running configs that reach a balanced placement of ``total``
    configs on equal ``live`` nodes: the fullest nodes keep the larger quotas."""
    if not live:
        return 0
    running = sorted((sum(1 for n in before.values() if n == x) for x in live), reverse=True)
    low, extra = divmod(total, len(live))
    kept = sum(min(count, low + (i < extra)) for i, count in enumerate(running))
    return sum(running) - kept


class PlannerMachine(RuleBasedStateMachine):
    """Membership and configs change at random; after every step Redis (modelled) holds
    exactly the plan: one node per config, every live node's desired set its share, a
    balanced placement, and no more moves than the fewest that balance needs."""

    def __init__(self) -> None:
        super().__init__()
        self.stored = Stored()
        self.written = Written()
        self.live: list[str] = []
        self.dead: list[str] = []
        self.wanted = Wanted(configs(0))
        self.next_node = 0
        self.last: Optional[Plan] = None
        self.expected_moves = 0

    def _replan(self) -> None:
        before = {c: n for c, n in self.written.assignment.items() if n in self.live}
        before = {c: n for c, n in before.items() if c in self.wanted.configs}
        self.expected_moves = fewest_moves(before, self.live, len(self.wanted.configs))
        members = Members({n: 1.0 for n in self.live}, dead=list(self.dead))
        self.last, self.written = step(self.stored, self.wanted, members, self.written)
        self.dead = []

    @rule()
    def join(self) -> None:
        self.live.append(f"n{self.next_node}")
        self.next_node += 1
        self._replan()

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def leave(self, data: st.DataObject) -> None:
        node = data.draw(st.sampled_from(self.live))
        self.live.remove(node)
        self.dead.append(node)
        self._replan()

    @rule(n=st.integers(0, 30), start=st.integers(0, 40))
    def set_configs(self, n: int, start: int) -> None:
        self.wanted = Wanted(configs(n, start))
        self._replan()

    @rule()
    def again(self) -> None:
        self._replan()
        assert self.last is not None and not self.last.change  # nothing changed: nothing

    @invariant()
    def redis_holds_the_plan(self) -> None:
        if self.last is None:
            return
        assignment = self.last.assignment
        assert self.stored.assignment == assignment
        assert self.stored.shares() == by_node(assignment)
        assert set(self.stored.configs) == set(self.wanted.configs)
        if self.live:
            assert set(assignment) == set(self.wanted.configs)
            counts = [len(by_node(assignment).get(n, ())) for n in self.live]
            assert max(counts) - min(counts) <= 1
        else:
            assert assignment == {}
        assert self.last.moved == self.expected_moves


PlannerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=25, deadline=None)
test_planner_machine = PlannerMachine.TestCase


@pytest.mark.parametrize("limit", [1, 3])
def test_paced_moves_never_exceed_the_limit_and_end_balanced(limit: int) -> None:
    """Arrivals come one tick late: at no tick do more than ``limit`` moves fly."""
    stored = Stored()
    wanted = Wanted(configs(20))
    _, written = step(stored, wanted, Members({"a": 1.0}))
    members = Members({"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0})
    moving: dict[str, str] = {}
    total = 0
    for _ in range(100):
        holders = {c: (n, 1) for c, n in moving.items()}
        result, written = step(
            stored, wanted, members, written, holders, pacing=Pacing(limit, True, moving)
        )
        moving = result.moving
        assert len(moving) <= limit
        total += result.moved
        if not moving and not result.held_back:
            break
    assert sorted(len(s) for s in by_node(written.assignment).values()) == [5, 5, 5, 5]
    assert total == 15  # paced, and still the fewest moves


def test_census_counts_what_runs_from_what_the_nodes_report() -> None:
    """Running is what the live nodes report, each node counting for at most what it is
    assigned; the rest runs nowhere; a node that runs fewer than it is assigned owes the
    difference (a handoff)."""
    wanted = ["a", "b", "c", "d", "e", "f"]
    assignment = {"a": "n1", "b": "n1", "c": "n2", "d": "n2", "e": "gone"}
    unplaced = {"f": "needs tags gpu"}
    # n1 still runs c (moving to n2) besides its own two; n2 has started one of its two:
    # c counts once n2 runs it
    counted = census(wanted, assignment, unplaced, {"n1": 3, "n2": 1, "n3": 0})
    assert counted == Census(
        nodes=3, configs=6, running=3, not_running=3, unplaceable=1, pending_handoff=2
    )
    # n1's report from before it stopped c, n2's from after it started it: c counts once,
    # and e, whose node is gone, still runs nowhere
    assert census(wanted, assignment, unplaced, {"n1": 3, "n2": 2}).not_running == 2
    # a config dropped by get_config may still run for a moment: never more than configs
    assert census(["a"], {"a": "n1"}, {}, {"n1": 2}) == Census(1, 1, 1, 0, 0, 0)
    assert census([], {}, {}, {}) == Census(0, 0, 0, 0, 0, 0)
    # what the leader wrote for configs it no longer has is not counted
    assert census(["a"], {"a": "n1", "z": "n1"}, {"z": "no live node"}, {"n1": 0}) == Census(
        1, 1, 0, 1, 0, 1
    )
    assert census(["a"], {"a": "n1"}, {}, {"n1": 1}).as_data() == {
        "nodes": 1,
        "configs": 1,
        "running": 1,
        "not_running": 0,
        "unplaceable": 0,
        "pending_handoff": 0,
    }


def test_repair_writes_back_only_what_redis_lost() -> None:
    """The repair's change set puts back the assignment entries and desired-set members
    Redis lost, takes out what it holds beyond the leader's copy, and is empty when the
    two agree; the config comparison sees any change of content or count."""
    mine = {"a": "n1", "b": "n1", "c": "n2"}
    expected = shares(mine, ["n1", "n2", "n3"])
    assert expected == {"n1": {"a", "b"}, "n2": {"c"}, "n3": set()}
    agreed = repair(mine, expected, dict(mine), {"n1": {"a", "b"}, "n2": {"c"}})
    assert not agreed
    lost = repair(
        mine, expected, {"a": "n1", "c": "n3", "z": "n2"}, {"n1": {"a"}, "n2": {"c", "z"}}
    )
    assert lost.assign == {"b": "n1", "c": "n2"} and lost.unassign == ["z"]
    assert lost.add == {"n1": ["b"]} and lost.rem == {"n2": ["z"]}
    assert lost.entries() == 5
    stored = configs(2)
    written = {c: cfg.json for c, cfg in stored.items()}
    assert not differ(stored, written)
    assert differ(configs(3), written)
    assert differ(stored, {**written, next(iter(written)): '{"id": 0, "x": 1}'})
