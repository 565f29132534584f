"""Properties of `dim.balance`: balance, minimal moves, stickiness, determinism, scale.

The minimal-move checks compare against references written here from scratch: an
exhaustive search over every valid quota vector for small weighted cases, and a
sort-based closed form for equal weights.  No Redis is involved.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import subprocess
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple, Optional, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dim.balance import (
    REASON_CAPACITY,
    REASON_INELIGIBLE,
    Placement,
    assign,
    assign_detailed,
    fair_bounds,
    moves,
    quotas,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
V = TypeVar("V")

# Small inputs keep the exhaustive reference cheap; deadline=None because a loaded CI
# machine makes per-example timing meaningless.
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HEAVY_PROPERTY = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

node_ids = st.text(max_size=4)
config_keys = st.text(max_size=6)
config_lists = st.lists(config_keys, max_size=40)
# Awkward floats on purpose: 0.1 + 0.2 != 0.3 in binary, so a float-based quota sum drifts.
float_weights = st.one_of(
    st.sampled_from([0.1, 0.2, 0.3, 1 / 3, 0.7, 2.5]),
    st.floats(min_value=1e-3, max_value=1e3, allow_nan=False, allow_infinity=False),
)


@st.composite
def weight_maps(
    draw: st.DrawFn, min_nodes: int = 1, max_nodes: int = 7, kind: str | None = None
) -> dict[str, float]:
    """Draw live nodes with equal, small-integer or awkward float weights."""
    ids = draw(st.lists(node_ids, min_size=min_nodes, max_size=max_nodes, unique=True))
    kind = kind or draw(st.sampled_from(["equal", "int", "float"]))
    if kind == "equal":
        return dict.fromkeys(ids, 1.0)
    if kind == "int":
        return {node: float(draw(st.integers(1, 5))) for node in ids}
    return {node: draw(float_weights) for node in ids}


@st.composite
def placements(
    draw: st.DrawFn, nodes: Mapping[str, float], configs: Iterable[str]
) -> dict[str, str]:
    """Draw a messy current placement: some unplaced, some on dead nodes, some unknown."""
    dead = [node for node in draw(st.lists(node_ids, max_size=3)) if node not in nodes]
    targets = sorted(nodes) + dead
    current: dict[str, str] = {}
    for config in configs:
        if draw(st.booleans()):
            current[config] = draw(st.sampled_from(targets))
    for stray in draw(st.lists(config_keys, max_size=3)):
        current.setdefault(stray, draw(st.sampled_from(targets)))
    return current


@st.composite
def scenarios(
    draw: st.DrawFn, max_nodes: int = 7, kind: str | None = None
) -> tuple[dict[str, float], list[str], dict[str, str]]:
    """Draw (nodes, configs, current) with an arbitrary, possibly unbalanced placement."""
    nodes = draw(weight_maps(max_nodes=max_nodes, kind=kind))
    configs = draw(config_lists)
    return nodes, configs, draw(placements(nodes, configs))


def surviving(
    placement: Mapping[str, str], nodes: Mapping[str, float], configs: Iterable[str]
) -> dict[str, str]:
    """Keep only placements whose node is live and whose config is still wanted."""
    wanted = set(configs)
    return {c: n for c, n in placement.items() if c in wanted and n in nodes}


def exact_shares(nodes: Mapping[str, float], total: int) -> dict[str, Fraction]:
    """Compute each node's exact share with Fractions (independently of the module)."""
    weight_sum = sum(Fraction(w) for w in nodes.values())
    return {node: total * Fraction(w) / weight_sum for node, w in nodes.items()}


def reference_min_moves_exhaustive(
    nodes: Mapping[str, float], configs: Iterable[str], current: Mapping[str, str]
) -> int:
    """Minimise sum(max(0, kept - quota)) over every floor/ceil quota vector summing to total."""
    wanted = set(configs)
    kept = Counter(surviving(current, nodes, wanted).values())
    shares = exact_shares(nodes, len(wanted))
    floors = {node: math.floor(share) for node, share in shares.items()}
    fractional = [node for node, share in shares.items() if share != floors[node]]
    spare = len(wanted) - sum(floors.values())
    return min(
        sum(max(0, kept[node] - floors[node] - (node in ceil_nodes)) for node in nodes)
        for ceil_nodes in map(set, itertools.combinations(fractional, spare))
    )


def reference_min_moves_equal(
    nodes: Iterable[str], configs: Iterable[str], current: Mapping[str, str]
) -> int:
    """Equal weights: the ceil quotas go to the nodes keeping the most."""
    live = list(nodes)
    wanted = set(configs)
    kept = Counter(surviving(current, dict.fromkeys(live, 1.0), wanted).values())
    base, spare = divmod(len(wanted), len(live))
    counts = sorted((kept[node] for node in live), reverse=True)
    return sum(max(0, k - base - (rank < spare)) for rank, k in enumerate(counts))


def assert_balanced(
    nodes: Mapping[str, float], configs: Iterable[str], result: Mapping[str, str]
) -> None:
    """Check full coverage, live nodes only, and floor/ceil counts per node."""
    wanted = set(configs)
    assert set(result) == wanted
    assert set(result.values()) <= set(nodes)
    counts = Counter(result.values())
    for node, (low, high) in fair_bounds(nodes, len(wanted)).items():
        assert low <= counts[node] <= high, (node, counts[node], low, high)
    if len(set(nodes.values())) == 1:
        per_node = [counts[node] for node in nodes]
        assert max(per_node) - min(per_node) <= 1


# --- balance ------------------------------------------------------------------------


@PROPERTY
@given(scenarios())
def test_balanced_from_any_start(
    scenario: tuple[dict[str, float], list[str], dict[str, str]],
) -> None:
    """Any start yields each config once, on a live node, within floor/ceil of its share."""
    nodes, configs, current = scenario
    assert_balanced(nodes, configs, assign(nodes, configs, current))


@PROPERTY
@given(weight_maps(max_nodes=12), st.integers(0, 500))
def test_fair_bounds_and_quotas_match_exact_shares(nodes: dict[str, float], total: int) -> None:
    """Bounds are the floor/ceil of total*w/W and quotas sum to total within them."""
    shares = exact_shares(nodes, total)
    bounds = fair_bounds(nodes, total)
    assert bounds == {n: (math.floor(s), math.ceil(s)) for n, s in shares.items()}
    result = quotas(nodes, total, {})
    assert sum(result.values()) == total
    assert all(bounds[n][0] <= q <= bounds[n][1] for n, q in result.items())


def test_quotas_prefer_kept_then_fraction() -> None:
    """Spare units go to nodes keeping more than their floor, then to larger fractions."""
    # Shares 4/3 and 8/3: with nothing kept the larger fraction (b) wins the spare unit.
    assert quotas({"a": 1.0, "b": 2.0}, 4, {}) == {"a": 1, "b": 3}
    # If a keeps 2 (> floor 1), giving a the unit saves a move, so a wins it.
    assert quotas({"a": 1.0, "b": 2.0}, 4, {"a": 2}) == {"a": 2, "b": 2}


def test_float_weights_sum_exactly() -> None:
    """Weights like 0.1 and 0.2 never make quotas miss the total through float error."""
    nodes = {f"n{i}": w for i, w in enumerate([0.1] * 7 + [0.2, 0.3, 1e-9, 1e9])}
    for total in (0, 1, 3, 10, 97, 1000, 123_457):
        assert sum(quotas(nodes, total, {}).values()) == total


@pytest.mark.parametrize("weight", [0.0, -1.0, math.nan, math.inf])
def test_bad_weights_rejected(weight: float) -> None:
    """Zero, negative, NaN or infinite weights raise ValueError instead of misplacing."""
    with pytest.raises(ValueError):
        assign({"a": 1.0, "b": weight}, ["x"], {})


# --- minimal moves ------------------------------------------------------------------


@PROPERTY
@given(scenarios())
def test_moves_minimal_from_any_start(
    scenario: tuple[dict[str, float], list[str], dict[str, str]],
) -> None:
    """Configs that could stay move only as much as the best quota vector requires."""
    nodes, configs, current = scenario
    result = assign(nodes, configs, current)
    assert moves(surviving(current, nodes, configs), result) == (
        reference_min_moves_exhaustive(nodes, configs, current)
    )


@PROPERTY
@given(scenarios(max_nodes=30, kind="equal"), st.lists(config_keys, max_size=300))
def test_moves_minimal_equal_weights_larger(
    scenario: tuple[dict[str, float], list[str], dict[str, str]], extra: list[str]
) -> None:
    """With equal weights moves equal the sort-based minimum, on larger instances."""
    nodes, configs, current = scenario
    configs = configs + extra
    # Pile many of the extra configs onto one node so shedding matters.
    current = {**{c: min(nodes) for c in extra[::2]}, **current}
    result = assign(nodes, configs, current)
    assert_balanced(nodes, configs, result)
    expected = reference_min_moves_equal(nodes, configs, current)
    assert moves(surviving(current, nodes, configs), result) == expected


Topology = tuple[dict[str, float], list[str]]
# ``data.draw`` and a composite's ``draw`` both fit this; st.DrawFn would reject the former.
Draw = Callable[[st.SearchStrategy[Any]], Any]


def _join(draw: Draw, nodes: dict[str, float], configs: list[str]) -> Topology:
    """Add one node with a drawn weight."""
    new = draw(node_ids.filter(lambda n: n not in nodes))
    return {**nodes, new: draw(float_weights)}, configs


def _leave(draw: Draw, nodes: dict[str, float], configs: list[str]) -> Topology:
    """Remove one node (the scenario always has at least two)."""
    gone = draw(st.sampled_from(sorted(nodes)))
    return {n: w for n, w in nodes.items() if n != gone}, configs


def _add(draw: Draw, nodes: dict[str, float], configs: list[str]) -> Topology:
    """Add a few configs."""
    return nodes, configs + draw(st.lists(config_keys, min_size=1, max_size=10))


def _remove(draw: Draw, nodes: dict[str, float], configs: list[str]) -> Topology:
    """Remove a subset of configs."""
    drop = draw(st.sets(st.sampled_from(configs))) if configs else set()
    return nodes, [c for c in configs if c not in drop]


def _reweight(draw: Draw, nodes: dict[str, float], configs: list[str]) -> Topology:
    """Change the weight of some nodes."""
    changed = draw(st.sets(st.sampled_from(sorted(nodes)), min_size=1))
    return {n: draw(float_weights) if n in changed else w for n, w in nodes.items()}, configs


EVENTS: dict[str, Callable[[Draw, dict[str, float], list[str]], Topology]] = {
    "join": _join,
    "leave": _leave,
    "config-add": _add,
    "config-remove": _remove,
    "weight-change": _reweight,
}


@pytest.mark.parametrize("event", sorted(EVENTS))
@HEAVY_PROPERTY
@given(data=st.data())
def test_moves_minimal_after_event(event: str, data: st.DataObject) -> None:
    """After a join, leave, config change or reweight, moves equal the exhaustive minimum."""
    nodes = data.draw(weight_maps(min_nodes=2))
    configs = data.draw(config_lists)
    before = assign(nodes, configs, data.draw(placements(nodes, configs)))
    new_nodes, new_configs = EVENTS[event](data.draw, nodes, configs)
    after = assign(new_nodes, new_configs, before)
    assert_balanced(new_nodes, new_configs, after)
    assert moves(surviving(before, new_nodes, new_configs), after) == (
        reference_min_moves_exhaustive(new_nodes, new_configs, before)
    )


def test_join_moves_only_what_the_newcomer_needs() -> None:
    """Joining a fourth equal node moves exactly its quota, all from the old nodes."""
    nodes = dict.fromkeys("abc", 1.0)
    configs = [f"c{i}" for i in range(12)]
    before = assign(nodes, configs, {})
    after = assign({**nodes, "d": 1.0}, configs, before)
    assert Counter(after.values()) == dict.fromkeys("abcd", 3)
    assert moves(before, after) == 3


def test_moves_counts_changed_keys_in_both() -> None:
    """moves() counts keys present in both mappings whose node differs."""
    assert moves({"x": "a", "y": "a", "z": "b"}, {"x": "a", "y": "b", "w": "c"}) == 1
    assert moves({}, {"x": "a"}) == 0


# --- stickiness and determinism -----------------------------------------------------


@PROPERTY
@given(scenarios())
def test_idempotent(scenario: tuple[dict[str, float], list[str], dict[str, str]]) -> None:
    """Feeding a result back in changes nothing: nothing moves when nothing needs to."""
    nodes, configs, current = scenario
    first = assign(nodes, configs, current)
    assert assign(nodes, configs, first) == first


@PROPERTY
@given(scenarios(), st.randoms(use_true_random=False))
def test_independent_of_input_order(
    scenario: tuple[dict[str, float], list[str], dict[str, str]], rng: random.Random
) -> None:
    """Shuffling node, config, placement and exclusion orders changes neither content nor order."""
    nodes, configs, current = scenario
    excluded = {c: frozenset(list(nodes)[:1]) for c in configs[::3]}
    expected = list(assign(nodes, configs, current, excluded).items())

    def shuffled_dict(mapping: Mapping[str, V]) -> dict[str, V]:
        items = list(mapping.items())
        rng.shuffle(items)
        return dict(items)

    shuffled_configs = configs + configs[::2]
    rng.shuffle(shuffled_configs)
    got = assign(
        shuffled_dict(nodes),
        iter(shuffled_configs),
        shuffled_dict(current),
        shuffled_dict(excluded),
    )
    assert list(got.items()) == expected


def test_same_result_under_any_hash_seed() -> None:
    """Processes with different PYTHONHASHSEED compute identical placements."""
    script = (
        "import json\n"
        "from dim.balance import assign\n"
        "nodes = {f'node-{i}': 1.0 + i % 3 for i in range(7)}\n"
        "configs = {f'cfg-{i}' for i in range(500)}\n"
        "first = assign(nodes, configs, {})\n"
        "del nodes['node-3']\n"
        "nodes['node-new'] = 2.0\n"
        "print(json.dumps([first, assign(nodes, configs, first)]))\n"
    )
    outputs = set()
    for seed in ("0", "1", "12345"):
        env = {
            **os.environ,
            "PYTHONHASHSEED": seed,
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        outputs.add(done.stdout)
    assert len(outputs) == 1


@PROPERTY
@given(scenarios())
def test_inputs_not_modified(
    scenario: tuple[dict[str, float], list[str], dict[str, str]],
) -> None:
    """assign() leaves its arguments untouched."""
    nodes, configs, current = scenario
    excluded = {c: {n} for c, n in list(current.items())[:3]}
    copies = (dict(nodes), list(configs), dict(current), {c: set(s) for c, s in excluded.items()})
    assign(nodes, configs, current, excluded)
    assert (nodes, configs, current, excluded) == copies


# --- exclusions ---------------------------------------------------------------------


@st.composite
def exclusions(
    draw: st.DrawFn, nodes: Mapping[str, float], configs: Iterable[str]
) -> dict[str, AbstractSet[str]]:
    """Draw exclusions naming live and dead nodes, sometimes every live node."""
    pool = [*sorted(nodes), "dead-node"]
    return {c: draw(st.sets(st.sampled_from(pool))) for c in configs if draw(st.booleans())}


@PROPERTY
@given(data=st.data())
def test_exclusions_respected_when_possible(data: st.DataObject) -> None:
    """A config never lands on an excluded node unless every live node is excluded."""
    nodes, configs, current = data.draw(scenarios())
    excluded = data.draw(exclusions(nodes, configs))
    result = assign(nodes, configs, current, excluded)
    assert set(result) == set(configs)
    assert set(result.values()) <= set(nodes)
    for config, refused in excluded.items():
        if not set(nodes) <= set(refused):
            assert result[config] not in refused


@PROPERTY
@given(data=st.data())
def test_exclusions_keep_balance_when_room_allows(data: st.DataObject) -> None:
    """One config refusing one node (of three or more) never costs balance."""
    nodes = data.draw(weight_maps(min_nodes=3, kind="equal"))
    configs = data.draw(config_lists)
    current = data.draw(placements(nodes, configs))
    banned = data.draw(st.sampled_from(sorted(nodes)))
    # At most one config is excluded, so some other node always has room for it.
    excluded = {configs[0]: {banned}} if configs else {}
    result = assign(nodes, configs, current, excluded)
    assert_balanced(nodes, configs, result)
    if configs:
        assert result[configs[0]] != banned


@PROPERTY
@given(data=st.data())
def test_idempotent_with_exclusions_once_balanced(data: st.DataObject) -> None:
    """A balanced result under exclusions is stable: feeding it back moves nothing."""
    nodes, configs, current = data.draw(scenarios())
    excluded = data.draw(exclusions(nodes, configs))
    first = assign(nodes, configs, current, excluded)
    counts = Counter(first.values())
    bounds = fair_bounds(nodes, len(set(configs)))
    if all(low <= counts[node] <= high for node, (low, high) in bounds.items()):
        assert assign(nodes, configs, first, excluded) == first


def test_excluded_current_placement_moves() -> None:
    """A config whose current node is excluded moves to another node."""
    result = assign({"a": 1.0, "b": 1.0}, ["x", "y"], {"x": "a", "y": "b"}, {"x": {"a"}})
    assert result == {"x": "b", "y": "a"}


def test_excluded_config_swaps_to_keep_balance() -> None:
    """When every eligible node is full, one of them hands over an unrestricted config."""
    nodes = {"a": 1.0, "b": 1.0, "c": 1.0}
    configs = ["x", "u", "v"]
    # Quotas are one each.  x refuses a and c, b is full with u, so b takes x and hands u
    # over to the free room (a or c) instead of going over quota.
    result = assign(nodes, configs, {"u": "b", "v": "c"}, {"x": {"a", "c"}})
    assert result == {"x": "b", "u": "a", "v": "c"}


def test_exclusion_overflow_goes_to_least_loaded_eligible() -> None:
    """If no eligible node has room or anything to hand over, the least loaded one overflows."""
    nodes = {"a": 1.0, "b": 1.0, "c": 2.0}
    configs = ["x", "y", "z", "u"]
    # Quotas are a:1, b:1, c:2 but x, y and z all refuse c, so a and b must hold three
    # restricted configs between them; u is handed over to c along the way.
    excluded = {"x": {"c"}, "y": {"c"}, "z": {"c"}}
    result = assign(nodes, configs, {"u": "b"}, excluded)
    assert {result[config] for config in ("x", "y", "z")} == {"a", "b"}
    assert result["u"] == "c"
    counts = Counter(result.values())
    assert sorted([counts["a"], counts["b"]]) == [1, 2]


def test_exclusion_of_every_node_is_ignored() -> None:
    """A config excluded from every live node is still placed (and may stay put)."""
    nodes = {"a": 1.0, "b": 1.0}
    assert assign(nodes, ["x"], {"x": "a"}, {"x": {"a", "b", "gone"}}) == {"x": "a"}
    assert assign(nodes, ["x"], {}, {"x": {"a", "b"}})["x"] in nodes


# --- edge cases ---------------------------------------------------------------------


def test_no_nodes_gives_empty() -> None:
    """Without live nodes nothing can be placed, so the result is empty."""
    assert assign({}, ["x", "y"], {"x": "a"}) == {}


def test_no_configs_gives_empty() -> None:
    """Without configs the result is empty, whatever the current placement says."""
    assert assign({"a": 1.0}, [], {"x": "a"}) == {}


def test_more_nodes_than_configs() -> None:
    """With more equal nodes than configs each node holds at most one."""
    nodes = {f"n{i}": 1.0 for i in range(10)}
    result = assign(nodes, ["x", "y", "z"], {"x": "n1", "y": "n1"})
    assert set(result) == {"x", "y", "z"}
    assert max(Counter(result.values()).values()) == 1
    assert result["x"] == "n1" or result["y"] == "n1"


def test_dead_nodes_and_unknown_configs_ignored() -> None:
    """Placements on dead nodes are reassigned and placements of unknown configs dropped."""
    result = assign({"a": 1.0}, ["x"], {"x": "dead", "ghost": "a"})
    assert result == {"x": "a"}


def test_duplicate_configs_placed_once() -> None:
    """A config listed twice is placed once and counted once for balance."""
    result = assign({"a": 1.0, "b": 1.0}, ["x", "x", "y"], {})
    assert sorted(result) == ["x", "y"]
    assert sorted(result.values()) == ["a", "b"]


# --- scale --------------------------------------------------------------------------


def test_scale_100k_configs_1k_nodes() -> None:
    """100,000 configs over 1,000 nodes: balanced from scratch and after a join, with the
    fewest moves (how fast: ``benchmarks/assign_scale.py``)."""
    nodes = {f"node-{i}": 1.0 for i in range(1000)}
    configs = [f"tenant/{i}/worker" for i in range(100_000)]
    first = assign(nodes, configs, {})
    joined = {**nodes, "node-new": 1.0}
    second = assign(joined, configs, first)
    assert_balanced(nodes, configs, first)
    assert_balanced(joined, configs, second)
    assert moves(first, second) == reference_min_moves_equal(joined, configs, first)


# --- eligibility, capacity and priority: references ---------------------------------
#
# Written from the definitions in the module docstring, by exhaustive search: the
# greedy selection checks each candidate set with Kuhn's augmenting paths, the fair
# shares enumerate every subset of classes, and the fewest moves enumerate every
# placement.  Small inputs only.

DEAD = "dead-node"  # longer than any drawn node id, so never live
# Fewer examples than PROPERTY: the references search exhaustively, and the suite must
# stay fast.
CONSTRAINED = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Case(NamedTuple):
    """One call of `assign_detailed`, with every argument spelled out."""

    nodes: dict[str, float]
    configs: list[str]
    current: dict[str, str]
    excluded: dict[str, AbstractSet[str]]
    eligible: dict[str, AbstractSet[str]]
    capacity: dict[str, int]
    priority: dict[str, int]

    def run(self, current: Optional[Mapping[str, str]] = None) -> Placement:
        """Call `assign_detailed` on this case (optionally from another placement)."""
        return assign_detailed(
            self.nodes,
            self.configs,
            self.current if current is None else current,
            self.excluded,
            eligible=self.eligible,
            capacity=self.capacity,
            priority=self.priority,
        )

    def allowed(self) -> dict[str, frozenset[str]]:
        """Live nodes each config may run on: eligible, minus exclusions that leave some."""
        result = {}
        for config in self.configs:
            base = set(self.nodes)
            if config in self.eligible:
                base &= set(self.eligible[config])
            rest = base - set(self.excluded.get(config, ()))
            result[config] = frozenset(rest or base)
        return result

    def live_capacity(self) -> dict[str, int]:
        """Capacity of the live nodes only."""
        return {node: limit for node, limit in self.capacity.items() if node in self.nodes}

    def surviving(self) -> dict[str, str]:
        """Current placements on live nodes (configs that could stay put)."""
        return {c: n for c, n in self.current.items() if n in self.nodes}


@st.composite
def constrained_cases(
    draw: st.DrawFn,
    min_nodes: int = 1,
    max_nodes: int = 4,
    max_configs: int = 6,
) -> Case:
    """Draw a small case with eligibility, exclusions, capacity and priority, all optional."""
    nodes = draw(weight_maps(min_nodes=min_nodes, max_nodes=max_nodes))
    configs = draw(st.lists(config_keys, max_size=max_configs))
    pool = [*sorted(nodes), DEAD]
    eligible = {c: draw(st.sets(st.sampled_from(pool))) for c in configs if draw(st.booleans())}
    excluded: dict[str, AbstractSet[str]] = {}
    if draw(st.booleans()):
        excluded = {
            c: draw(st.sets(st.sampled_from(pool), max_size=2))
            for c in configs
            if draw(st.integers(0, 3)) == 0
        }
    capacity: dict[str, int] = {}
    if draw(st.booleans()):
        capacity = {n: draw(st.integers(0, 3)) for n in pool if draw(st.booleans())}
    priority = {c: draw(st.integers(-1, 2)) for c in configs if draw(st.booleans())}
    current = draw(placements(nodes, configs))
    return Case(nodes, configs, current, excluded, eligible, capacity, priority)


def fits_all(
    chosen: list[str], allowed: Mapping[str, AbstractSet[str]], capacity: Mapping[str, int]
) -> bool:
    """Return whether every chosen config gets its own slot (Kuhn's augmenting paths)."""
    slots = [
        node
        for node in sorted({n for c in chosen for n in allowed[c]})
        for _ in range(min(capacity.get(node, len(chosen)), len(chosen)))
    ]
    owner: list[Optional[str]] = [None] * len(slots)

    def augment(config: str, seen: set[int]) -> bool:
        for k, node in enumerate(slots):
            if node in allowed[config] and k not in seen:
                seen.add(k)
                holder = owner[k]
                if holder is None or augment(holder, seen):
                    owner[k] = config
                    return True
        return False

    return all(augment(config, set()) for config in chosen)


def reference_selection(case: Case) -> set[str]:
    """Greedy by (priority desc, running first, CRC-32, key): keep a config if all still fit."""
    allowed = case.allowed()
    capacity = case.live_capacity()

    def rank(config: str) -> tuple[int, bool, int, str]:
        running = case.current.get(config) in allowed[config]
        return (-case.priority.get(config, 0), not running, zlib.crc32(config.encode()), config)

    chosen: list[str] = []
    for config in sorted((c for c in set(case.configs) if allowed[c]), key=rank):
        if fits_all([*chosen, config], allowed, capacity):
            chosen.append(config)
    return set(chosen)


def water_level(weights: Mapping[str, Fraction], caps: Mapping[str, int], target: int) -> Fraction:
    """Return the least ``lam >= 0`` with ``sum(min(cap, lam * w)) >= target``."""

    def filled(lam: Fraction) -> Fraction:
        return sum(
            (min(Fraction(caps[n]), lam * w) if n in caps else lam * w for n, w in weights.items()),
            Fraction(0),
        )

    # Piecewise linear in lam, with a breakpoint where each capped node fills up.
    points = sorted({Fraction(caps[n]) / w for n, w in weights.items() if n in caps} - {0})
    low = Fraction(0)
    for point in [*points, None]:
        if point is not None and filled(point) < target:
            low = point
            continue
        slope = sum(
            (w for n, w in weights.items() if n not in caps or Fraction(caps[n]) / w > low),
            Fraction(0),
        )
        return low if slope == 0 else low + (target - filled(low)) / slope
    raise AssertionError("unreachable")


def _room(nodes: Iterable[str], lam: Fraction, case: Case) -> Fraction:
    """Return ``sum(min(cap, lam * w))`` over ``nodes``."""
    caps = case.live_capacity()
    total = Fraction(0)
    for node in nodes:
        fill = lam * Fraction(case.nodes[node])
        total += min(Fraction(caps[node]), fill) if node in caps else fill
    return total


def reference_levels(
    case: Case, placed: Iterable[str]
) -> tuple[dict[str, Fraction], dict[frozenset[str], int], dict[str, int]]:
    """Fair shares by brute force: (share per node, level per class, level per node).

    Most crowded level first: ``lam`` is the largest water level over every subset of
    the remaining classes (on the remaining nodes); the level holds every class of every
    subset that fills its nodes exactly at ``lam``, and those nodes get
    ``min(cap, lam * w)``; then both leave.
    """
    caps = case.live_capacity()
    allowed = case.allowed()
    remaining = dict(Counter(allowed[c] for c in placed))
    free = set(case.nodes)
    share = dict.fromkeys(case.nodes, Fraction(0))
    class_level: dict[frozenset[str], int] = {}
    node_level: dict[str, int] = {}
    level = 0
    while remaining:
        subsets = [
            (sum(remaining[cls] for cls in group), {n for cls in group for n in cls} & free, group)
            for size in range(1, len(remaining) + 1)
            for group in itertools.combinations(remaining, size)
        ]
        lam = max(
            water_level({n: Fraction(case.nodes[n]) for n in reach}, caps, need)
            for need, reach, _ in subsets
        )
        tight = {
            cls
            for need, reach, group in subsets
            if need == _room(reach, lam, case)
            for cls in group
        }
        tight_nodes = {n for cls in tight for n in cls} & free
        for node in tight_nodes:
            share[node] = _room([node], lam, case)
            node_level[node] = level
        for cls in tight:
            class_level[cls] = level
            del remaining[cls]
        free -= tight_nodes
        level += 1
    return share, class_level, node_level


def reference_fewest_moves(case: Case, placed: Iterable[str]) -> int:
    """Fewest surviving configs moved over every placement meeting the fair shares."""
    share, class_level, node_level = reference_levels(case, placed)
    allowed = case.allowed()
    ordered = sorted(placed)
    options = [
        [n for n in sorted(allowed[c]) if node_level.get(n) == class_level[allowed[c]]]
        for c in ordered
    ]
    surviving = case.surviving()
    best = math.inf
    for choice in itertools.product(*options):
        counts = Counter(choice)
        if all(math.floor(s) <= counts[n] <= math.ceil(s) for n, s in share.items()):
            moved = sum(1 for c, n in zip(ordered, choice) if c in surviving and surviving[c] != n)
            best = min(best, moved)
    assert best < math.inf, "no placement meets the fair shares"
    return int(best)


def assert_valid(case: Case, placement: Placement) -> None:
    """Check the hard rules: coverage, eligibility, exclusions, capacity, reasons."""
    allowed = case.allowed()
    assert set(placement.assignment) | set(placement.unplaced) == set(case.configs)
    assert not set(placement.assignment) & set(placement.unplaced)
    for config, node in placement.assignment.items():
        assert node in allowed[config], (config, node)
    counts = Counter(placement.assignment.values())
    for node, limit in case.live_capacity().items():
        assert counts[node] <= limit, (node, counts[node], limit)
    for config, reason in placement.unplaced.items():
        assert reason == (REASON_CAPACITY if allowed[config] else REASON_INELIGIBLE)
    assert placement.assignment == assign(
        case.nodes,
        case.configs,
        case.current,
        case.excluded,
        eligible=case.eligible,
        capacity=case.capacity,
        priority=case.priority,
    )


# --- eligibility, capacity and priority: properties ---------------------------------


@CONSTRAINED
@given(constrained_cases(max_nodes=6, max_configs=20))
def test_constraints_never_violated(case: Case) -> None:
    """Placed configs run on live eligible nodes within capacity; the rest carry a reason."""
    assert_valid(case, case.run())


@CONSTRAINED
@given(constrained_cases())
def test_waiting_configs_follow_priority(case: Case) -> None:
    """The placed set is the greedy one: priority, then running, then hash order."""
    placement = case.run()
    assert set(placement.assignment) == reference_selection(case)
    assert_valid(case, placement)
    if not case.capacity:
        assert REASON_CAPACITY not in placement.unplaced.values()


@CONSTRAINED
@given(constrained_cases())
def test_fair_shares_and_levels(case: Case) -> None:
    """Shares match the brute-force fair shares; counts are their floor or ceiling."""
    placement = case.run()
    share, class_level, node_level = reference_levels(case, placement.assignment)
    assert placement.shares == share
    counts = Counter(placement.assignment.values())
    for node, value in share.items():
        assert math.floor(value) <= counts[node] <= math.ceil(value), (node, value)
    allowed = case.allowed()
    for config, node in placement.assignment.items():
        # Every config runs on its own level, never on a more crowded one.
        assert node_level[node] == class_level[allowed[config]]


@CONSTRAINED
@given(constrained_cases(max_nodes=6, max_configs=20))
def test_loads_even_among_eligible_nodes(case: Case) -> None:
    """No config could move to an allowed node with room and make loads per weight closer.

    For a config on ``u`` and any node ``v`` it may run on, below capacity:
    ``count_u / w_u - count_v / w_v < 1 / w_u + 1 / w_v``.  With equal weights and no
    capacity that reads ``count_u <= count_v + 1``.
    """
    placement = case.run()
    counts = Counter(placement.assignment.values())
    weight = {n: Fraction(w) for n, w in case.nodes.items()}
    capacity = case.live_capacity()
    allowed = case.allowed()
    for config, u in placement.assignment.items():
        for v in allowed[config]:
            if counts[v] < capacity.get(v, math.inf):
                gap = counts[u] / weight[u] - counts[v] / weight[v]
                assert gap < 1 / weight[u] + 1 / weight[v], (config, u, v, counts)
                if len(set(case.nodes.values())) == 1 and not capacity:
                    assert counts[u] <= counts[v] + 1


@CONSTRAINED
@given(constrained_cases())
def test_moves_minimal_under_constraints(case: Case) -> None:
    """Surviving configs move exactly as few times as the fair shares force."""
    placement = case.run()
    assert moves(case.surviving(), placement.assignment) == reference_fewest_moves(
        case, placement.assignment
    )


@CONSTRAINED
@given(constrained_cases(max_nodes=6, max_configs=20))
def test_idempotent_under_constraints(case: Case) -> None:
    """Feeding a constrained result back in changes nothing, placed or waiting."""
    first = case.run()
    again = case.run(current=first.assignment)
    assert again.assignment == first.assignment
    assert again.unplaced == first.unplaced


@pytest.mark.parametrize("event", ["join", "leave"])
@CONSTRAINED
@given(data=st.data())
def test_moves_minimal_after_join_or_leave_under_constraints(
    event: str, data: st.DataObject
) -> None:
    """After a node joins (with its own eligibility) or leaves, moves are the forced minimum.

    Forced means: a surviving config moves only when no placement meeting the new fair
    shares keeps it, counted by exhaustive search over every such placement.
    """
    case = data.draw(constrained_cases(min_nodes=2 if event == "leave" else 1, max_nodes=3))
    before = case.run()
    nodes, eligible = dict(case.nodes), dict(case.eligible)
    capacity = dict(case.capacity)
    if event == "join":
        new = data.draw(node_ids.filter(lambda n: n not in nodes))
        nodes[new] = data.draw(float_weights)
        for config in eligible:
            if data.draw(st.booleans()):
                eligible[config] = {*eligible[config], new}
        if data.draw(st.booleans()):
            capacity[new] = data.draw(st.integers(0, 3))
    else:
        del nodes[data.draw(st.sampled_from(sorted(nodes)))]
    after_case = case._replace(
        nodes=nodes, eligible=eligible, capacity=capacity, current=before.assignment
    )
    after = after_case.run()
    assert_valid(after_case, after)
    assert set(after.assignment) == reference_selection(after_case)
    assert moves(after_case.surviving(), after.assignment) == reference_fewest_moves(
        after_case, after.assignment
    )


def test_forced_move_keeps_balance() -> None:
    """A config may move off a node that is not over quota when balance forces it.

    d has left.  x may run only on a or d, so it must go to a, whose fair share (two) a
    already holds with p1 and p2; one of them moves to b, which has room.  Every balanced
    placement moves one config, and so does assign.
    """
    nodes = dict.fromkeys("abc", 1.0)
    p_nodes, q_nodes = frozenset("ab"), frozenset("bc")
    eligible = {
        "x": frozenset("ad"),
        **dict.fromkeys(["p1", "p2"], p_nodes),
        **dict.fromkeys(["q1", "q2", "q3"], q_nodes),
    }
    current = {"x": "d", "p1": "a", "p2": "a", "q1": "b", "q2": "c", "q3": "c"}
    placement = assign_detailed(nodes, list(eligible), current, eligible=eligible)
    assert placement.shares == dict.fromkeys("abc", Fraction(2))
    assert placement.assignment["x"] == "a"
    assert Counter(placement.assignment.values()) == dict.fromkeys("abc", 2)
    surviving = {c: n for c, n in current.items() if n in nodes}
    assert moves(surviving, placement.assignment) == 1


# --- priority and capacity: examples ------------------------------------------------


def test_priority_displaces_running_config() -> None:
    """A higher-priority config takes the place of a running lower-priority one."""
    placement = assign_detailed(
        {"a": 1.0}, ["low", "high"], {"low": "a"}, capacity={"a": 1}, priority={"high": 1}
    )
    assert placement.assignment == {"high": "a"}
    assert placement.unplaced == {"low": REASON_CAPACITY}


def test_running_config_stays_on_priority_tie() -> None:
    """Among equal priorities the running config keeps its place, whatever the hash order."""
    for running, other in (("x", "y"), ("y", "x")):
        placement = assign_detailed({"a": 1.0}, ["x", "y"], {running: "a"}, capacity={"a": 1})
        assert placement.assignment == {running: "a"}
        assert placement.unplaced == {other: REASON_CAPACITY}


def test_capacity_spreads_to_nodes_with_room() -> None:
    """A capped node holds its capacity; the others share the rest evenly."""
    nodes = dict.fromkeys("abc", 1.0)
    configs = [f"c{i}" for i in range(10)]
    placement = assign_detailed(nodes, configs, {}, capacity={"a": 2})
    assert placement.shares == {"a": 2, "b": 4, "c": 4}
    assert Counter(placement.assignment.values()) == {"a": 2, "b": 4, "c": 4}
    assert placement.unplaced == {}


def test_zero_capacity_everywhere_places_nothing() -> None:
    """With no room anywhere every config waits for capacity."""
    placement = assign_detailed(
        {"a": 1.0, "b": 2.0}, ["x", "y"], {"x": "a"}, capacity={"a": 0, "b": 0}
    )
    assert placement.assignment == {}
    assert placement.unplaced == {"x": REASON_CAPACITY, "y": REASON_CAPACITY}


def test_ineligible_config_left_out() -> None:
    """A config whose eligible nodes are all dead is reported and never placed."""
    result = assign({"a": 1.0}, ["x", "y"], {"x": "a"}, eligible={"x": {"gone"}, "y": set()})
    assert result == {}
    placement = assign_detailed({"a": 1.0}, ["x", "y", "z"], {}, eligible={"x": {"gone"}})
    assert placement.unplaced == {"x": REASON_INELIGIBLE}
    assert placement.assignment == {"y": "a", "z": "a"}


def test_exclusion_ignored_only_when_no_eligible_node_is_left() -> None:
    """An exclusion covering every eligible node is dropped; eligibility never is."""
    nodes = dict.fromkeys("abc", 1.0)
    result = assign(nodes, ["x"], {}, {"x": {"a"}}, eligible={"x": {"a"}})
    assert result == {"x": "a"}
    result = assign(nodes, ["x"], {}, {"x": {"a"}}, eligible={"x": {"a", "b"}})
    assert result == {"x": "b"}


# --- defaults, bad input, determinism -----------------------------------------------


@CONSTRAINED
@given(scenarios())
def test_detailed_without_new_arguments_matches_assign(
    scenario: tuple[dict[str, float], list[str], dict[str, str]],
) -> None:
    """Without eligibility or capacity everything is placed, as assign() places it."""
    nodes, configs, current = scenario
    placement = assign_detailed(nodes, configs, current)
    assert placement.assignment == assign(nodes, configs, current)
    assert placement.unplaced == {}
    assert placement.shares == exact_shares(nodes, len(set(configs)))


def test_detailed_with_no_nodes() -> None:
    """Without live nodes every config is unplaced as ineligible."""
    placement = assign_detailed({}, ["x", "y"], {"x": "a"})
    assert placement == Placement(
        assignment={}, unplaced=dict.fromkeys(["x", "y"], REASON_INELIGIBLE), shares={}
    )
    assert repr(placement) == "Placement(placed=0, unplaced={'ineligible': 2}, nodes=0)"


def test_generous_capacity_changes_nothing() -> None:
    """Capacity at or above every ceiling share gives the unconstrained placement."""
    nodes = {f"n{i}": 1.0 + i % 2 for i in range(5)}
    configs = [f"c{i}" for i in range(37)]
    ceilings = {node: high for node, (_, high) in fair_bounds(nodes, len(configs)).items()}
    assert assign(nodes, configs, {}, capacity=ceilings) == assign(nodes, configs, {})


@pytest.mark.parametrize("limit", [-1, 1.5, 2.0, "2", True, None])
def test_bad_capacity_rejected(limit: object) -> None:
    """A capacity that is not an int >= 0 raises ValueError naming the node and value."""
    with pytest.raises(ValueError, match=repr(limit).replace(".", r"\.")) as raised:
        assign({"a": 1.0}, ["x"], {}, capacity={"a": limit})  # type: ignore[dict-item]
    assert "'a'" in str(raised.value)


@pytest.mark.parametrize("rank", [1.0, "1", False, None])
def test_bad_priority_rejected(rank: object) -> None:
    """A priority that is not an int raises ValueError naming the config and value."""
    with pytest.raises(ValueError, match="'x'"):
        assign({"a": 1.0}, ["x"], {}, priority={"x": rank})  # type: ignore[dict-item]


def test_unknown_keys_ignored() -> None:
    """Eligibility and priority of unknown configs, capacity of dead nodes: no effect."""
    nodes = {"a": 1.0, "b": 1.0}
    configs = ["x", "y", "z"]
    plain = assign(nodes, configs, {})
    assert (
        assign(
            nodes,
            configs,
            {},
            eligible={"ghost": {"a"}},
            capacity={"dead": 0},
            priority={"ghost": 5},
        )
        == plain
    )
    # Dead nodes inside an eligibility set are ignored too.
    assert assign(nodes, configs, {}, eligible={"x": {"a", "b", "dead"}}) == plain


@CONSTRAINED
@given(constrained_cases(max_nodes=6, max_configs=20), st.randoms(use_true_random=False))
def test_independent_of_input_order_under_constraints(case: Case, rng: random.Random) -> None:
    """Shuffling every input mapping and list changes neither content nor order."""
    expected = case.run()

    def shuffled(mapping: Mapping[str, V]) -> dict[str, V]:
        items = list(mapping.items())
        rng.shuffle(items)
        return dict(items)

    configs = case.configs + case.configs[::2]
    rng.shuffle(configs)
    got = Case(
        shuffled(case.nodes),
        configs,
        shuffled(case.current),
        shuffled(case.excluded),
        shuffled({c: frozenset(s) for c, s in case.eligible.items()}),
        shuffled(case.capacity),
        shuffled(case.priority),
    ).run()
    assert list(got.assignment.items()) == list(expected.assignment.items())
    assert list(got.unplaced.items()) == list(expected.unplaced.items())
    assert got.shares == expected.shares


def test_constrained_result_same_under_any_hash_seed() -> None:
    """Processes with different PYTHONHASHSEED agree under eligibility and capacity too."""
    script = (
        "import json\n"
        "from dim.balance import assign_detailed\n"
        "nodes = {f'node-{i}': 1.0 + i % 3 for i in range(9)}\n"
        "groups = [{n for n in nodes if int(n[5:]) % 3 == g} for g in range(3)]\n"
        "configs = [f'cfg-{i}' for i in range(300)]\n"
        "eligible = {c: groups[i % 3] for i, c in enumerate(configs) if i % 4}\n"
        "capacity = {'node-0': 5, 'node-4': 0}\n"
        "priority = {c: i % 2 for i, c in enumerate(configs)}\n"
        "first = assign_detailed(nodes, configs, {}, {'cfg-1': {'node-1'}},\n"
        "    eligible=eligible, capacity=capacity, priority=priority)\n"
        "del nodes['node-3']\n"
        "second = assign_detailed(nodes, configs, first.assignment,\n"
        "    eligible=eligible, capacity={'node-1': 20}, priority=priority)\n"
        "print(json.dumps([list(p.assignment.items()) + list(p.unplaced.items())\n"
        "    for p in (first, second)]))\n"
    )
    outputs = set()
    for seed in ("0", "12345"):
        env = {
            **os.environ,
            "PYTHONHASHSEED": seed,
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        outputs.add(done.stdout)
    assert len(outputs) == 1


def test_scale_three_tag_groups() -> None:
    """100,000 configs on 1,000 nodes in 3 tag groups: valid and balanced, then a join."""
    nodes = {f"node-{i}": 1.0 for i in range(1000)}
    configs = [f"tenant/{i}/worker" for i in range(100_000)]

    def eligibility(live: Mapping[str, float]) -> dict[str, frozenset[str]]:
        groups = [frozenset(n for n in live if zlib.crc32(n.encode()) % 3 == g) for g in range(3)]
        return {c: groups[i % 3] for i, c in enumerate(configs) if i % 4 != 3}

    joined = {**nodes, "node-new": 1.0}
    first = assign_detailed(nodes, configs, {}, eligible=eligibility(nodes))
    second = assign_detailed(joined, configs, first.assignment, eligible=eligibility(joined))
    for live, placement in ((nodes, first), (joined, second)):
        eligible = eligibility(live)
        assert placement.unplaced == {}
        assert all(node in eligible.get(c, live) for c, node in placement.assignment.items())
        counts = Counter(placement.assignment.values())
        for node, value in placement.shares.items():
            assert math.floor(value) <= counts[node] <= math.ceil(value)
        # Untagged configs fill in, so the groups balance out to one level.
        assert max(counts.values()) - min(counts[n] for n in live) <= 1
    assert moves(first.assignment, second.assignment) <= 100
