"""Pure placement of configs on weighted nodes: balanced, sticky and deterministic.

`assign` decides which live node runs each configured instance; `assign_detailed` does
the same and also reports the configs it left out (and why) and each node's fair share.
Neither performs I/O or reads a clock or random source, so every process that sees the
same inputs computes the same answer, and a coordinator can recompute it at will.

Inputs and terms
----------------
``nodes`` maps each live node to a weight > 0; ``current`` is the existing placement.
Three optional constraints narrow where a config may run:

* ``eligible`` (hard): the nodes allowed to run a config; a config missing from it may
  run anywhere.  A config none of whose eligible nodes is live is left out, with reason
  `REASON_INELIGIBLE`.
* ``excluded`` (soft): nodes a config recently failed on.  Honoured unless it would
  leave no eligible live node, in which case it is ignored (there would be nowhere to go).
* ``capacity`` (hard): the most configs a node may run.  Configs that do not fit are
  left out, with reason `REASON_CAPACITY`; ``priority`` (an int, default 0) decides which.

A config's *allowed nodes* are its live eligible nodes minus its honoured exclusions.
Configs with the same allowed nodes form a *class*; a config *survives* when its current
node is live and allowed, and *moves* when it survives but lands elsewhere.

The *fair shares* are the loads of the most even placement if configs could be split:
among all fractional placements of the placed configs on their allowed nodes within
capacity, the one whose highest load per unit of weight is lowest, then the next highest,
and so on.  These loads are unique.  They come in *levels*, found most crowded first: the
level value ``λ`` is the least load per weight at which the remaining classes fit with
node ``i`` taking at most ``min(cap_i, λ * w_i)``; the level is the largest set of
remaining classes that then fills its allowed remaining nodes exactly; those nodes get
share ``min(cap_i, λ * w_i)``, and both classes and nodes leave before the next level.
Nodes no placed config may use get share 0.  Without constraints there is one level and
node ``i`` gets ``T * w_i / W`` (``T`` configs, ``W`` the sum of weights); more generally
shares are ``T * w_i / W`` whenever the constraints allow that.

Algorithm
---------
When every config may run on every live node and no capacity is below the ceiling of a
node's share, the *unconstrained path* runs:

1. *Keep what may stay.*  A current placement survives if its node is live and its
   config still wanted; survivors give each node its *kept* count.
2. *Quotas by weighted largest remainder.*  Node ``i`` is owed exactly ``T * w_i / W``.
   Each node gets the floor of that share and the ``R`` units left over go to nodes
   whose share has a fractional part, preferring (a) nodes keeping more than their
   floor, since the unit saves a move there, then (b) the larger fractional part, then
   (c) the CRC-32 of the node id.  Shares are computed with integers (weights scaled to
   a common denominator), so float rounding can never make the quotas sum to anything
   but ``T``.
3. *Shed surplus.*  A node keeping more than its quota keeps the configs whose CRC-32 of
   ``"config\\0node"`` (the *pair hash*) is highest and releases the rest.
4. *Fill free room.*  Released, orphaned and new configs, sorted by the CRC-32 of their
   key (*hash order*), are zipped against a list of free slots: nodes ordered by the
   CRC-32 of their id, each repeated as many times as it has room.

Otherwise the *constrained path* runs.  It works on classes and on *node types* (nodes
that the same classes may use), never on single configs, until the last step:

1. *Classes.*  Each distinct eligibility set object is intersected with the live nodes
   once; exclusions then split off classes of their own.
2. *Selection* (only with capacity).  If a maximum flow shows that every config fits,
   all are placed.  Otherwise configs are ranked by priority (highest first), then
   surviving before not, then hash order, and taken greedily: a config is placed if it
   fits together with every config placed before it.  Once a class does not fit it
   never fits again, so the greedy run takes one binary search over the ranking per
   class at most, each step a maximum flow.
3. *Fair shares.*  Levels as defined above, each ``λ`` found by Dinkelbach's method: guess
   the level at which all remaining classes fit exactly, and while a maximum flow shows
   some set of classes does not fit, take that set's own exact level as the next guess.
   All arithmetic is exact (integers and Fractions).  Node ``i`` may then hold
   ``floor(share_i)`` to ``ceil(share_i)`` configs, and a class only the nodes of its
   own level.
4. *Fewest moves.*  A minimum-cost flow sends the placed configs from their classes
   through types to nodes, within those bounds.  A class may also reach a node directly
   at cost -1 per surviving config it has there (on a node of its level), and each
   node's floor is worth ``-(M + 1)``, more than all possible savings, so the cheapest
   flow meets every floor and, among such flows, keeps the most survivors.  It is the
   primal-dual method: each phase computes shortest distances (Dijkstra) and saturates
   the arcs of zero reduced cost (Dinic).
5. *Configs.*  On each (node, class) the flow keeps some survivors: those with the
   highest pair hash stay and the rest are released.  The flow through each type is
   split among its nodes in proportion to the classes entering it (largest remainders),
   so that every node holds a mix of the classes that may use it and a later join or
   leave can move configs one hop rather than along chains.  The other configs of each
   class, in hash order, are zipped against that class's slots, nodes in CRC-32 order.

Guarantees
----------
* Validity: a placed config runs on a live node that is eligible for it and, unless the
  exclusion would leave no eligible node, not excluded; no node exceeds its capacity;
  every config is either placed or reported in ``Placement.unplaced``, never both.
* Selection: without capacity every config with a live eligible node is placed.  With
  capacity, a config waits only if it does not fit together with the placed configs
  ranked ahead of it, so the most configs that fit are placed, and priority is strict:
  a running config may be stopped so that a higher-priority one runs (there is no
  pre-emption cost), while among equal priorities the running configs keep their places.
* Balance: every node holds the floor or the ceiling of its fair share, and a config
  runs only on nodes of its own level, never on a more crowded one.  Without
  constraints, counts are the floor or ceiling of ``T * w_i / W`` and, with equal
  weights, differ by at most one.  Under constraints, for a config on node ``u`` and any
  node ``v`` it may run on that is below capacity,
  ``count_u / w_u - count_v / w_v < 1 / w_u + 1 / w_v``: with equal weights,
  ``count_u <= count_v + 1``, so no single move would even the loads out.
* Minimal moves: among all placements of the selected configs with the balance above,
  the result moves the fewest surviving configs.  Without constraints this minimum is
  ``min(sum(max(0, kept_i - quota_i)))`` over quota vectors of floors and ceilings, and
  step 2 attains it.  Feeding a result back in moves nothing (idempotence).  So a
  surviving config moves only when balance forces it: usually because its node holds
  more than its share, but also when a config that can go nowhere else needs its place
  on a node that is not over its share (no balanced placement then moves fewer).
* Determinism: every tie is broken by CRC-32 and then by the string itself, never by
  Python's per-process salted ``hash()``, set order or input iteration order; the
  placement and the unplaced configs iterate in hash order, the shares in node order.
* Complexity, for ``M`` configs and ``N`` nodes: the unconstrained path takes
  ``O(M log M + N log N)`` time and ``O(M + N)`` memory.  The constrained path adds
  ``O(M)`` C-level passes over the configs and flows over ``K`` classes and ``T <= N``
  node types: a few maximum flows per level on ``K + T`` vertices, ``O(K log M)`` more
  only when capacity is short, and one minimum-cost flow on ``K + T + N`` vertices and
  ``O(K * T + N + S)`` arcs (``S`` the (node, class) pairs holding survivors) in at most
  ``4 * K + 2`` phases, since a simple path's cost takes one of that many values.  With
  a few tag groups ``K`` and ``T`` are small; each distinct exclusion set is a class of
  its own, so many different exclusion sets make the ``K * T`` term the largest.
"""

from __future__ import annotations

import heapq
import math
import operator
import zlib
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from fractions import Fraction
from itertools import compress
from typing import Optional, cast

import attrs

__all__ = [
    "REASON_CAPACITY",
    "REASON_INELIGIBLE",
    "Placement",
    "assign",
    "assign_detailed",
    "fair_bounds",
    "moves",
    "quotas",
]

REASON_INELIGIBLE = "ineligible"
"""Why a config is unplaced: no live node is eligible to run it (or no node is live)."""

REASON_CAPACITY = "capacity"
"""Why a config is unplaced: its eligible nodes are full with configs ranked ahead of it."""

# Larger than any distance in the flows below (they are bounded by a few times the
# number of configs), and an int, so distances stay exact.
_INFINITY = 1 << 62


@attrs.frozen(repr=False)
class Placement:
    """What `assign_detailed` decided: where configs run, which wait and why, fair shares.

    :ivar assignment: ``config -> node`` for every placed config; the dict `assign`
        returns, in an order that does not depend on the input order.
    :ivar unplaced: ``config -> reason`` for every config left out, in the same order:
        `REASON_INELIGIBLE` or `REASON_CAPACITY`.
    :ivar shares: each live node's exact fair share (a `~fractions.Fraction`); the node
        holds its floor or its ceiling.  See "Guarantees" in the module docstring.

    Example::

        >>> placement = assign_detailed(
        ...     {"a": 1.0, "b": 1.0},
        ...     ["x", "y", "z"],
        ...     {"x": "b"},
        ...     eligible={"z": {"gone"}},
        ...     capacity={"a": 0, "b": 1},
        ... )
        >>> placement.assignment
        {'x': 'b'}
        >>> placement.unplaced
        {'y': 'capacity', 'z': 'ineligible'}
        >>> placement
        Placement(placed=1, unplaced={'capacity': 1, 'ineligible': 1}, nodes=2)
    """

    assignment: dict[str, str]
    unplaced: dict[str, str]
    shares: dict[str, Fraction]

    def __repr__(self) -> str:
        reasons = dict(sorted(Counter(self.unplaced.values()).items()))
        return (
            f"Placement(placed={len(self.assignment)}, unplaced={reasons}, "
            f"nodes={len(self.shares)})"
        )


def _node_hash(node: str) -> int:
    """Return the stable CRC-32 of a node id.

    Python's built-in ``hash`` of a string is salted per process, so two coordinators
    would disagree; CRC-32 is the same everywhere.
    """
    return zlib.crc32(node.encode("utf-8"))


def _pair_hash(config: str, node: str) -> int:
    """Return the stable CRC-32 of a (config, node) pair.

    The NUL separator keeps ``("ab", "c")`` and ``("a", "bc")`` from colliding trivially.
    """
    return zlib.crc32(f"{config}\x00{node}".encode())


def _order_key(key: str) -> tuple[int, str]:
    """Return the sort key that orders nodes by stable hash, then by id.

    Sorting by hash rather than by name spreads ids that share a prefix; the id itself
    settles the rare CRC collision so the order stays total.
    """
    return (zlib.crc32(key.encode("utf-8")), key)


def _hash_sorted(keys: Iterable[str]) -> list[str]:
    """Return the distinct ``keys`` ordered by CRC-32, ties broken by the key itself.

    This is the same order as ``sorted(set(keys), key=_order_key)`` but about twice as
    fast on large inputs: sorting on a plain integer avoids building a tuple per key and
    comparing tuples.  CRC-32 collisions are not rare at this scale (a few in 100,000
    keys is typical), so runs of equal hashes are then sorted by key.
    """
    crc = zlib.crc32
    hashes = {key: crc(key.encode("utf-8")) for key in keys}
    ordered = sorted(hashes, key=hashes.__getitem__)
    if len(set(hashes.values())) < len(ordered):
        in_order = [hashes[key] for key in ordered]
        # Runs of equal hashes are disjoint, so fixing them in any order is deterministic.
        for value in {a for a, b in zip(in_order, in_order[1:]) if a == b}:
            start, stop = bisect_left(in_order, value), bisect_right(in_order, value)
            ordered[start:stop] = sorted(ordered[start:stop])
    return ordered


def _integer_weights(nodes: Mapping[str, float]) -> dict[str, int]:
    """Scale the weights to integers with the same ratios.

    Every finite float is a dyadic rational, so ``Fraction`` represents it exactly and
    multiplying by the least common denominator yields exact integers.  Integer shares
    then avoid float error entirely.
    """
    fractions: dict[str, Fraction] = {}
    for node, weight in nodes.items():
        as_float = float(weight)
        if not (math.isfinite(as_float) and as_float > 0):
            raise ValueError(f"weight of node {node!r} must be finite and > 0, got {weight!r}")
        fractions[node] = Fraction(weight)
    denominator = 1
    for value in fractions.values():
        denominator = denominator * value.denominator // math.gcd(denominator, value.denominator)
    return {
        node: value.numerator * (denominator // value.denominator)
        for node, value in fractions.items()
    }


def _shares(weights: Mapping[str, int], total: int) -> dict[str, tuple[int, int]]:
    """Return each node's exact share of ``total`` as ``(floor, remainder)``.

    With integer weights the share of node ``i`` is ``floor + remainder / sum(weights)``;
    all remainders share that denominator, so comparing them compares fractional parts.
    """
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    weight_sum = sum(weights.values())
    return {node: divmod(total * weight, weight_sum) for node, weight in weights.items()}


def _quotas(
    weights: Mapping[str, int], total: int, kept_counts: Mapping[str, int]
) -> dict[str, int]:
    """Compute `quotas` from weights already scaled to integers."""
    shares = _shares(weights, total)
    result = {node: floor for node, (floor, _) in shares.items()}
    spare = total - sum(result.values())
    if spare:
        candidates = [node for node, (_, remainder) in shares.items() if remainder]
        # ``False`` sorts first, so nodes keeping more than their floor lead.
        candidates.sort(
            key=lambda node: (
                kept_counts.get(node, 0) <= result[node],
                -shares[node][1],
                _node_hash(node),
                node,
            )
        )
        # Fractional parts sum to ``spare`` and each is below one, so there are always
        # more candidates than spare units.
        for node in candidates[:spare]:
            result[node] += 1
    return result


def fair_bounds(nodes: Mapping[str, float], total: int) -> dict[str, tuple[int, int]]:
    """Return the floor and ceiling of each node's exact share ``total * w / W``.

    A balanced placement gives every node a count within these bounds; when the share
    is an integer both bounds are equal.
    """
    return {
        node: (floor, floor + (1 if remainder else 0))
        for node, (floor, remainder) in _shares(_integer_weights(nodes), total).items()
    }


def quotas(
    nodes: Mapping[str, float], total: int, kept_counts: Mapping[str, int]
) -> dict[str, int]:
    """Return how many of ``total`` configs each node should hold.

    This is the weighted largest-remainder method: every node gets the floor of its
    exact share, and the units left over go to nodes with a fractional share, first to
    those keeping more than their floor (each such unit saves one move), then by larger
    fractional part, then by the CRC-32 of the node id.  Nodes missing from
    ``kept_counts`` keep nothing.  The quotas always sum to ``total``.
    """
    return _quotas(_integer_weights(nodes), total, kept_counts)


def moves(old: Mapping[str, str], new: Mapping[str, str]) -> int:
    """Return how many configs present in both mappings changed node."""
    if len(new) < len(old):
        old, new = new, old
    return sum(1 for config, node in old.items() if config in new and new[config] != node)


def _shed(node: str, held: list[str], quota: int) -> list[str]:
    """Trim ``held`` in place to ``quota`` configs and return the released ones.

    The configs with the highest pair hash stay.  The rule depends only on the pair, so
    it is deterministic and shedding from one node is independent of the others.
    """
    held.sort(key=lambda config: (_pair_hash(config, node), config), reverse=True)
    released = held[quota:]
    del held[quota:]
    return released


# --- the constrained path ----------------------------------------------------------


class _Network:
    """A flow network in residual form, for the small flow problems of the constrained path.

    Arcs come in pairs: arc ``a`` and its reverse ``a ^ 1``, so the tail of ``a`` is
    ``to[a ^ 1]`` and the flow on a forward arc is the room left on its reverse.
    Capacities and costs are integers, so every answer is exact.
    """

    __slots__ = ("adj", "cap", "cost", "to")

    def __init__(self, size: int) -> None:
        self.adj: list[list[int]] = [[] for _ in range(size)]
        self.to: list[int] = []
        self.cap: list[int] = []
        self.cost: list[int] = []

    def arc(self, tail: int, head: int, cap: int, cost: int = 0) -> int:
        """Add an arc (and its empty reverse) and return its index."""
        index = len(self.to)
        self.to.extend((head, tail))
        self.cap.extend((cap, 0))
        self.cost.extend((cost, -cost))
        self.adj[tail].append(index)
        self.adj[head].append(index + 1)
        return index

    def flow(self, arc: int) -> int:
        """Return the flow on a forward arc."""
        return self.cap[arc ^ 1]

    def max_flow(self, source: int, sink: int, admissible: Optional[list[bool]] = None) -> int:
        """Push as much flow as the room allows (Dinic's algorithm) and return how much.

        :param admissible: when given, only arcs marked ``True`` may carry new flow.
        """
        adj, to, cap = self.adj, self.to, self.cap
        total = 0
        while True:
            depth = [-1] * len(adj)
            depth[source] = 0
            queue = [source]
            for vertex in queue:
                below = depth[vertex] + 1
                for arc in adj[vertex]:
                    head = to[arc]
                    if depth[head] < 0 and cap[arc] > 0 and (admissible is None or admissible[arc]):
                        depth[head] = below
                        queue.append(head)
            if depth[sink] < 0:
                return total
            cursor = [0] * len(adj)
            path: list[int] = []
            vertex = source
            while True:
                if vertex == sink:
                    push = min(cap[arc] for arc in path)
                    for arc in path:
                        cap[arc] -= push
                        cap[arc ^ 1] += push
                    total += push
                    path.clear()
                    vertex = source
                    continue
                arcs = adj[vertex]
                below = depth[vertex] + 1
                index = cursor[vertex]
                while index < len(arcs):
                    arc = arcs[index]
                    if (
                        cap[arc] > 0
                        and depth[to[arc]] == below
                        and (admissible is None or admissible[arc])
                    ):
                        break
                    index += 1
                cursor[vertex] = index
                if index < len(arcs):
                    path.append(arcs[index])
                    vertex = to[arcs[index]]
                elif path:
                    depth[vertex] = -1  # a dead end: no later path of this round passes here
                    vertex = to[path.pop() ^ 1]
                    cursor[vertex] += 1
                else:
                    break

    def reachable(self, start: int, forward: bool = True) -> list[bool]:
        """Mark the vertices ``start`` reaches through arcs with room (or that reach it)."""
        to, cap = self.to, self.cap
        seen = [False] * len(self.adj)
        seen[start] = True
        queue = [start]
        for vertex in queue:
            for arc in self.adj[vertex]:
                head = to[arc]
                if not seen[head] and cap[arc if forward else arc ^ 1] > 0:
                    seen[head] = True
                    queue.append(head)
        return seen

    def min_cost_flow(self, source: int, sink: int, amount: int, potential: list[int]) -> None:
        """Send ``amount`` units from ``source`` to ``sink`` at the least total cost.

        This is the primal-dual method.  ``potential`` must keep every reduced cost
        ``cost + potential[tail] - potential[head]`` of an arc with room non-negative
        (shortest distances from the source do); it is updated in place.  Each phase
        finds shortest distances with Dijkstra's algorithm, then fills the arcs of zero
        reduced cost with a maximum flow, so the number of phases is the number of
        distinct path costs used, not the amount of flow.
        """
        adj, to, cap, cost = self.adj, self.to, self.cap, self.cost
        size = len(adj)
        pushed = 0
        while pushed < amount:
            dist = [_INFINITY] * size
            dist[source] = 0
            heap = [(0, source)]
            while heap:
                reached, vertex = heapq.heappop(heap)
                if reached > dist[vertex]:
                    continue
                base = reached + potential[vertex]
                for arc in adj[vertex]:
                    if cap[arc] > 0:
                        head = to[arc]
                        candidate = base + cost[arc] - potential[head]
                        if candidate < dist[head]:
                            dist[head] = candidate
                            heapq.heappush(heap, (candidate, head))
            horizon = dist[sink]
            if horizon == _INFINITY:
                raise AssertionError("no placement meets the fair shares (a bug in dim.balance)")
            # Capping at the sink's distance keeps reduced costs non-negative for the
            # vertices Dijkstra did not settle before the sink.
            for vertex in range(size):
                potential[vertex] += min(dist[vertex], horizon)
            admissible = [
                cost[arc] + potential[to[arc ^ 1]] == potential[to[arc]] for arc in range(len(to))
            ]
            pushed += self.max_flow(source, sink, admissible)


def _node_types(
    signatures: list[list[int]], active: Optional[AbstractSet[int]] = None
) -> tuple[list[int], list[tuple[int, ...]], list[list[int]]]:
    """Group nodes by the classes that may use them.

    Returns each node's type (-1 when no class may use it), each type's classes in
    ascending order, and each type's nodes in node order.  Nodes of one type are
    interchangeable for every flow question about classes, which keeps those flows small.
    """
    type_of: list[int] = []
    type_classes: list[tuple[int, ...]] = []
    type_nodes: list[list[int]] = []
    index: dict[tuple[int, ...], int] = {}
    for node, signature in enumerate(signatures):
        key = tuple(signature) if active is None else tuple(j for j in signature if j in active)
        if not key:
            type_of.append(-1)
            continue
        number = index.get(key)
        if number is None:
            number = index[key] = len(type_classes)
            type_classes.append(key)
            type_nodes.append([])
        type_of.append(number)
        type_nodes[number].append(node)
    return type_of, type_classes, type_nodes


def _fits(demand: list[int], type_classes: list[tuple[int, ...]], room: list[int]) -> bool:
    """Return whether ``demand[j]`` configs of every class ``j`` fit in the types' room."""
    total = sum(demand)
    n_classes, n_types = len(demand), len(type_classes)
    sink = n_classes + n_types + 1
    net = _Network(sink + 1)
    for j, amount in enumerate(demand):
        if amount:
            net.arc(0, 1 + j, amount)
    for tau, classes in enumerate(type_classes):
        vertex = 1 + n_classes + tau
        for j in classes:
            if demand[j]:
                net.arc(1 + j, vertex, total)
        net.arc(vertex, sink, min(room[tau], total))
    return net.max_flow(0, sink) == total


def _select(
    ordered: list[str],
    cls: list[int],
    staying: list[bool],
    demand: list[int],
    signatures: list[list[int]],
    cap: list[Optional[int]],
    priority: Optional[Mapping[str, int]],
) -> set[int]:
    """Return the positions in ``ordered`` of the configs that wait for capacity.

    Configs are ranked by priority (highest first), then running before not running,
    then hash order, and taken greedily: a config is placed if it fits together with
    every config placed before it.  Capacity constraints form a matroid, so this greedy
    set places the most configs, lexicographically best by rank.  Configs of one class
    are interchangeable, so once a class does not fit it never fits again: the greedy
    run is found by binary search over the ranking, one search per class at most.
    """
    _, type_classes, type_nodes = _node_types(signatures)
    total = sum(demand)
    room = []
    for members in type_nodes:
        limit_sum = 0
        for node in members:
            limit = cap[node]
            if limit is None:
                limit_sum = total  # an unlimited node: the type never runs out
                break
            limit_sum += limit
        room.append(limit_sum)
    if _fits(demand, type_classes, room):
        return set()
    placeable = [i for i, j in enumerate(cls) if j >= 0]
    if priority:
        # Stable sort: ties keep the hash order of ``placeable``.
        ranked = sorted(placeable, key=lambda i: (-priority.get(ordered[i], 0), not staying[i]))
    else:
        ranked = [i for i in placeable if staying[i]] + [i for i in placeable if not staying[i]]
    positions: list[list[int]] = [[] for _ in demand]
    for rank, i in enumerate(ranked):
        positions[cls[i]].append(rank)
    blocked: dict[int, int] = {}

    def fits_before(rank: int) -> bool:
        counts = [
            blocked[j] if j in blocked else bisect_left(positions[j], rank)
            for j in range(len(demand))
        ]
        return _fits(counts, type_classes, room)

    start, end = 0, len(ranked)
    while not fits_before(end):
        low, high = start, end  # the configs ranked before ``low`` fit, before ``high`` not
        while high - low > 1:
            middle = (low + high) // 2
            if fits_before(middle):
                low = middle
            else:
                high = middle
        j = cls[ranked[low]]
        blocked[j] = bisect_left(positions[j], low)
        start = low + 1
    return {ranked[rank] for j, count in blocked.items() for rank in positions[j][count:]}


def _water_level(
    types: AbstractSet[int],
    target: int,
    type_of: list[int],
    by_breakpoint: list[int],
    weight: list[int],
    cap: list[Optional[int]],
) -> Fraction:
    """Return the least ``λ`` with ``sum(min(cap_i, λ * w_i)) >= target`` over ``types``.

    ``by_breakpoint`` lists nodes by ``cap_i / w_i`` (uncapped last), the order in which
    a rising ``λ`` fills them.
    """
    capped = 0
    free_weight = sum(weight[node] for node in by_breakpoint if type_of[node] in types)
    for node in by_breakpoint:
        if type_of[node] not in types:
            continue
        limit = cap[node]
        if limit is None or (target - capped) * weight[node] <= limit * free_weight:
            return Fraction(target - capped, free_weight)
        capped += limit
        free_weight -= weight[node]
    raise AssertionError("selected configs exceed capacity (a bug in dim.balance)")


def _fair_shares(
    demand: Mapping[int, int],
    type_of: list[int],
    type_classes: list[tuple[int, ...]],
    type_nodes: list[list[int]],
    weight: list[int],
    cap: list[Optional[int]],
) -> tuple[list[Fraction], dict[int, int], list[int]]:
    """Return each node's fair share, each class's level and each type's level.

    Levels are found most crowded first.  For the remaining classes, ``λ`` is the least
    load per weight at which they fit with node ``i`` taking at most
    ``min(cap_i, λ * w_i)``: starting from the level at which all of them would fit
    exactly, a maximum flow either succeeds or names a set of classes that does not fit,
    whose own exact level is the next guess (Dinkelbach's method; ``λ`` only rises).  At
    the final ``λ`` the classes that cannot reach free room in the residual flow form the
    largest set that fills its nodes exactly: that is the level.  Its nodes get
    ``min(cap_i, λ * w_i)`` and leave, with its classes, for the next round.
    """
    type_level = [-1] * len(type_classes)
    class_level: dict[int, int] = {}
    share = [Fraction(0)] * len(weight)
    class_types: dict[int, list[int]] = {j: [] for j in demand}
    for tau, classes in enumerate(type_classes):
        for j in classes:
            class_types[j].append(tau)

    def breakpoint(node: int) -> tuple[int, Fraction]:
        limit = cap[node]
        return (1, Fraction(0)) if limit is None else (0, Fraction(limit, weight[node]))

    by_breakpoint = sorted(
        (node for node in range(len(weight)) if type_of[node] >= 0), key=breakpoint
    )
    remaining = sorted(demand)
    open_types = {tau for j in remaining for tau in class_types[j]}
    level = 0
    while remaining:
        group = remaining
        total = sum(demand[j] for j in group)
        level_value = _water_level(open_types, total, type_of, by_breakpoint, weight, cap)
        while True:
            numerator, scale = level_value.numerator, level_value.denominator
            type_list = sorted(open_types)
            class_vertex = {j: 1 + k for k, j in enumerate(group)}
            type_vertex = {tau: 1 + len(group) + k for k, tau in enumerate(type_list)}
            sink = 1 + len(group) + len(type_list)
            net = _Network(sink + 1)
            for j in group:
                net.arc(0, class_vertex[j], demand[j] * scale)
                for tau in class_types[j]:
                    if tau in open_types:
                        net.arc(class_vertex[j], type_vertex[tau], total * scale)
            for tau in type_list:
                # ``min(cap, λ w)`` scaled by the denominator of ``λ`` is an integer.
                room = 0
                for node in type_nodes[tau]:
                    limit = cap[node]
                    fill = numerator * weight[node]
                    room += fill if limit is None else min(limit * scale, fill)
                net.arc(type_vertex[tau], sink, room)
            if net.max_flow(0, sink) == total * scale:
                break
            reached = net.reachable(0)
            short = [j for j in group if reached[class_vertex[j]]]
            short_types = {tau for j in short for tau in class_types[j] if tau in open_types}
            short_total = sum(demand[j] for j in short)
            level_value = _water_level(
                short_types, short_total, type_of, by_breakpoint, weight, cap
            )
        free = net.reachable(sink, forward=False)
        tight = [j for j in group if not free[class_vertex[j]]]
        tight_types = {tau for j in tight for tau in class_types[j] if tau in open_types}
        for tau in tight_types:
            type_level[tau] = level
            for node in type_nodes[tau]:
                limit = cap[node]
                filled = level_value * weight[node]
                share[node] = filled if limit is None or filled <= limit else Fraction(limit)
        for j in tight:
            class_level[j] = level
        remaining = [j for j in remaining if j not in class_level]
        open_types -= tight_types
        level += 1
    return share, class_level, type_level


def _assign_constrained(
    weights: Mapping[str, int],
    node_order: list[str],
    ordered: list[str],
    classes: list[frozenset[str]],
    cls: list[int],
    holders: list[Optional[str]],
    staying: list[bool],
    caps: Mapping[str, int],
    priority: Optional[Mapping[str, int]],
) -> tuple[dict[str, str], list[str], dict[str, Fraction]]:
    """Place configs whose allowed nodes differ, or on nodes whose capacity binds.

    ``cls``, ``holders`` and ``staying`` come from `_resolve` (and are modified: configs
    that wait leave their class).  Returns the placement, the configs that wait for
    capacity (in hash order), and the fair shares.  See the module docstring.
    """
    size = len(node_order)
    position = {node: i for i, node in enumerate(node_order)}
    weight = [weights[node] for node in node_order]
    cap = [caps.get(node) for node in node_order]
    signatures: list[list[int]] = [[] for _ in range(size)]
    for j, allowed in enumerate(classes):
        if len(allowed) == size:
            for signature in signatures:
                signature.append(j)
        else:
            for node_id in allowed:
                signatures[position[node_id]].append(j)
    counted = Counter(cls)
    demand = [counted[j] for j in range(len(classes))]
    waiting: list[str] = []
    if caps:
        late = _select(ordered, cls, staying, demand, signatures, cap, priority)
        for i in sorted(late):
            demand[cls[i]] -= 1
            cls[i] = -1
            staying[i] = False
            waiting.append(ordered[i])
    active = {j: amount for j, amount in enumerate(demand) if amount}
    type_of, type_classes, type_nodes = _node_types(signatures, active.keys())
    share, class_level, type_level = _fair_shares(
        active, type_of, type_classes, type_nodes, weight, cap
    )
    low = [value.numerator // value.denominator for value in share]
    high = [floor + (value.denominator != 1) for floor, value in zip(low, share)]

    # The flow: source -> class (its count) -> type -> node (at most its ceiling) -> sink,
    # plus class -> node arcs of cost -1, one per node holding configs of that class that
    # may stay.  Node -> sink arcs carry the floor at cost -bonus and the one extra unit at
    # cost 0.  The bonus exceeds any saving of moves, so a cheapest flow meets every floor
    # (a placement meeting them exists) and, among those, keeps the most configs.
    amount = sum(active.values())
    bonus = amount + 1
    class_ids = sorted(active)
    class_vertex = {j: 1 + k for k, j in enumerate(class_ids)}
    type_base = 1 + len(class_ids)
    node_base = type_base + len(type_classes)
    sink = node_base + size
    net = _Network(sink + 1)
    for j in class_ids:
        net.arc(0, class_vertex[j], active[j])
    type_inflow: list[list[tuple[int, int]]] = [[] for _ in type_classes]
    for tau, type_classes_here in enumerate(type_classes):
        for j in type_classes_here:
            # A class only uses the nodes of its own level: the more crowded levels are
            # exactly filled by their own classes.
            if class_level[j] == type_level[tau]:
                arc = net.arc(class_vertex[j], type_base + tau, amount)
                type_inflow[tau].append((j, arc))
    type_outflow: list[list[tuple[int, int]]] = [[] for _ in type_classes]
    for tau, members in enumerate(type_nodes):
        # Larger fractional shares first, so that rounding up favours them on ties.
        for node in sorted(members, key=lambda node: (low[node] - share[node], node)):
            if high[node]:
                arc = net.arc(type_base + tau, node_base + node, high[node])
                type_outflow[tau].append((node, arc))
    # Configs that may stay where they run, counted per (node, class): the node must
    # hold anything and belong to the class's level.
    held: dict[tuple[str, int], int] = {}
    for (holder, j), count in Counter(compress(zip(holders, cls), staying)).items():
        if holder is not None:
            node = position[holder]
            if high[node] and type_level[type_of[node]] == class_level[j]:
                held[holder, j] = count
    keep_arcs = {
        key: net.arc(class_vertex[key[1]], node_base + position[key[0]], held[key], -1)
        for key in sorted(held, key=lambda key: (position[key[0]], key[1]))
    }
    # Shortest distances from the source in this acyclic network start the potentials.
    potential = [0] * (sink + 1)
    for node_id, _ in keep_arcs:
        potential[node_base + position[node_id]] = -1
    for node in range(size):
        if low[node]:
            net.arc(node_base + node, sink, low[node], -bonus)
            potential[sink] = min(potential[sink], potential[node_base + node] - bonus)
        if high[node] > low[node]:
            net.arc(node_base + node, sink, high[node] - low[node])
            potential[sink] = min(potential[sink], potential[node_base + node])
    net.min_cost_flow(0, sink, amount, potential)

    whole: set[tuple[str, int]] = set()
    partial: dict[tuple[str, int], int] = {}
    for key, arc in keep_arcs.items():
        stay = net.flow(arc)
        if stay == held[key]:
            whole.add(key)
        else:
            partial[key] = stay
    # Every placed config enters ``placement`` now, in hash order, and the configs that
    # stay get their node; the rest is filled in below.
    if -1 in counted or waiting:
        placement = dict.fromkeys(compress(ordered, [j >= 0 for j in cls]), "")
    else:
        placement = dict.fromkeys(ordered, "")
    stay_mask = list(map(whole.__contains__, zip(holders, cls)))
    # A config that stays has a holder: ``whole`` names only real nodes.
    placement.update(
        zip(compress(ordered, stay_mask), compress(cast("list[str]", holders), stay_mask))
    )
    pools: dict[int, list[str]] = {j: [] for j in class_ids}
    trimmed: dict[tuple[str, int], list[str]] = {key: [] for key in partial}
    for config, holder, j in compress(zip(ordered, holders, cls), map(operator.not_, stay_mask)):
        if j >= 0:
            configs = trimmed.get((holder, j)) if partial and holder is not None else None
            (pools[j] if configs is None else configs).append(config)
    for (node_id, j), configs in trimmed.items():
        pools[j].extend(_shed(node_id, configs, partial[node_id, j]))
        for config in configs:
            placement[config] = node_id
    for j in {j for _, j in trimmed}:
        pools[j] = _hash_sorted(pools[j])  # released configs rejoin the hash order
    # Split each type's inflow among its nodes.  Any split is valid, since every class
    # entering a type may use all of its nodes; a proportional one (largest remainders,
    # ties to the lower class) gives every node a mix of the classes that use it, so a
    # later join or leave can move configs one hop instead of along chains.
    targets: dict[int, list[tuple[int, int]]] = {j: [] for j in class_ids}
    for tau, inflow in enumerate(type_inflow):
        sources = [[j, net.flow(arc)] for j, arc in inflow if net.flow(arc)]
        left = sum(units for _, units in sources)
        for node, arc in type_outflow[tau]:
            units = net.flow(arc)
            if not units:
                continue
            parts = [divmod(units * available, left) for _, available in sources]
            spare = units - sum(whole for whole, _ in parts)
            bumped = set(sorted(range(len(parts)), key=lambda k: -parts[k][1])[:spare])
            for k, source in enumerate(sources):
                take = parts[k][0] + (k in bumped)
                if take:
                    targets[source[0]].append((node, take))
                    source[1] -= take
            left -= units
    for j in class_ids:
        slots = [node_order[node] for node, units in sorted(targets[j]) for _ in range(units)]
        if len(slots) != len(pools[j]):
            raise AssertionError("placed and free counts disagree (a bug in dim.balance)")
        placement.update(zip(pools[j], slots))
    return placement, waiting, {node: share[i] for i, node in enumerate(node_order)}


def _assign_unconstrained(
    weights: Mapping[str, int],
    ordered: list[str],
    node_order: list[str],
    current: Mapping[str, str],
) -> dict[str, str]:
    """Place configs that may run on any live node, none of which is capacity-bound."""
    held: dict[str, list[str]] = {node: [] for node in node_order}
    unplaced: list[str] = []
    # Every config enters ``result`` now, in hash order; later assignments only update
    # values, which keeps that order without building a second dict at the end.
    result: dict[str, str] = {}
    for config in ordered:
        node = current.get(config)
        if node is not None and node in held:
            held[node].append(config)
            result[config] = node
            continue
        unplaced.append(config)
        result[config] = ""  # placeholder, always overwritten below

    quota = _quotas(weights, len(ordered), {node: len(kept) for node, kept in held.items()})
    released: list[str] = []
    for node in node_order:
        if len(held[node]) > quota[node]:
            released.extend(_shed(node, held[node], quota[node]))
    if released:
        # Re-merge so that placement below sees one list in hash order.
        unplaced.extend(released)
        unplaced = _hash_sorted(unplaced)

    # Rooms sum to len(unplaced): quotas sum to the number of configs and each node
    # holds at most its quota.
    slots: list[str] = []
    for node in node_order:
        room = quota[node] - len(held[node])
        if room > 0:
            slots.extend([node] * room)
    for config, node in zip(unplaced, slots):
        result[config] = node
    return result


def _resolve(
    ordered: list[str],
    live: frozenset[str],
    current: Mapping[str, str],
    excluded: Optional[Mapping[str, AbstractSet[str]]],
    eligible: Optional[Mapping[str, AbstractSet[str]]],
) -> tuple[list[frozenset[str]], list[int], list[Optional[str]], list[bool]]:
    """Group the configs by the set of live nodes allowed to run them.

    Returns the distinct allowed sets ("classes", numbered in order of first use along
    ``ordered``) and, for each config of ``ordered``: its class (-1 when no live node is
    eligible), its current node (or None), and whether it may stay there (the node is
    live, eligible and not excluded).  Each distinct eligibility set object is
    intersected with the live nodes once, so callers that share one set object per
    requirement pay for it once; the per-config work is done by C-level ``map`` calls,
    except for configs with an exclusion.
    """
    classes: list[frozenset[str]] = []
    numbers: dict[frozenset[str], int] = {}

    def number_of(allowed: frozenset[str]) -> int:
        number = numbers.get(allowed)
        if number is None:
            number = numbers[allowed] = len(classes)
            classes.append(allowed)
        return number

    if eligible:
        wanted = list(map(eligible.get, ordered))
        by_id: dict[int, int] = {}
        for key, value in dict(zip(map(id, wanted), wanted)).items():
            if value is None:
                by_id[key] = number_of(live)
            else:
                part = live.intersection(value)
                # Keep the ``live`` object for "every live node" so it is one class.
                by_id[key] = number_of(live if part == live else part) if part else -1
        cls = list(map(by_id.__getitem__, map(id, wanted)))
    else:
        cls = [number_of(live)] * len(ordered)
    holders = list(map(current.get, ordered))
    allowed_pairs = {(node, j) for j, allowed in enumerate(classes) for node in allowed}
    staying = list(map(allowed_pairs.__contains__, zip(holders, cls)))
    if excluded:
        for i in compress(range(len(ordered)), map(excluded.__contains__, ordered)):
            refused = excluded[ordered[i]]
            if cls[i] < 0 or not refused:
                continue
            allowed = classes[cls[i]]
            rest = allowed.difference(refused)
            # An exclusion covering every allowed node cannot be honoured; dropping it
            # (rather than leaving the config unplaced) keeps the service running.
            if rest and len(rest) < len(allowed):
                cls[i] = number_of(rest)
                staying[i] = holders[i] in rest
    return classes, cls, holders, staying


def _checked_capacity(capacity: Optional[Mapping[str, int]]) -> dict[str, int]:
    """Return ``capacity`` as a dict after checking every limit is an int >= 0."""
    if not capacity:
        return {}
    for node, limit in capacity.items():
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"capacity of node {node!r} must be an int >= 0, got {limit!r}")
    return dict(capacity)


def _check_priority(priority: Optional[Mapping[str, int]]) -> None:
    """Raise ValueError if some priority is not an int."""
    if priority:
        for config, rank in priority.items():
            if isinstance(rank, bool) or not isinstance(rank, int):
                raise ValueError(f"priority of config {config!r} must be an int, got {rank!r}")


def _assign(
    nodes: Mapping[str, float],
    configs: Iterable[str],
    current: Mapping[str, str],
    excluded: Optional[Mapping[str, AbstractSet[str]]],
    eligible: Optional[Mapping[str, AbstractSet[str]]],
    capacity: Optional[Mapping[str, int]],
    priority: Optional[Mapping[str, int]],
    detailed: bool,
) -> tuple[dict[str, str], dict[str, str], dict[str, Fraction]]:
    """Compute the placement, the unplaced configs with reasons, and (if detailed) shares."""
    caps = _checked_capacity(capacity)
    _check_priority(priority)
    if not nodes:
        nowhere = dict.fromkeys(_hash_sorted(configs), REASON_INELIGIBLE) if detailed else {}
        return {}, nowhere, {}
    weights = _integer_weights(nodes)
    # Walking configs in hash order makes every later list (kept, released, unplaced)
    # come out already ordered, and makes the result independent of input order.
    ordered = _hash_sorted(configs)
    node_order = sorted(nodes, key=_order_key)
    live_caps = {node: limit for node, limit in caps.items() if node in weights}
    unplaced: dict[str, str] = {}
    placeable = ordered
    if eligible or excluded or live_caps:
        live = frozenset(weights)
        classes, cls, holders, staying = _resolve(ordered, live, current, excluded, eligible)
        if -1 in cls:
            unplaced = dict.fromkeys(compress(ordered, [j < 0 for j in cls]), REASON_INELIGIBLE)
            placeable = list(compress(ordered, [j >= 0 for j in cls]))
        binding = False
        if live_caps:
            bounds = _shares(weights, len(placeable))
            binding = any(
                limit < floor + (remainder > 0)
                for node, limit in live_caps.items()
                for floor, remainder in (bounds[node],)
            )
        if binding or len(classes) > 1 or (classes and classes[0] is not live):
            placement, waiting, shares = _assign_constrained(
                weights, node_order, ordered, classes, cls, holders, staying, live_caps, priority
            )
            if waiting:
                unplaced.update(dict.fromkeys(waiting, REASON_CAPACITY))
                unplaced = {c: unplaced[c] for c in ordered if c in unplaced}
            return placement, unplaced, shares
    placement = _assign_unconstrained(weights, placeable, node_order, current)
    shares = {}
    if detailed:
        weight_sum = sum(weights.values())
        shares = {node: Fraction(len(placeable) * weights[node], weight_sum) for node in node_order}
    return placement, unplaced, shares


def assign(
    nodes: Mapping[str, float],
    configs: Iterable[str],
    current: Mapping[str, str],
    excluded: Optional[Mapping[str, AbstractSet[str]]] = None,
    *,
    eligible: Optional[Mapping[str, AbstractSet[str]]] = None,
    capacity: Optional[Mapping[str, int]] = None,
    priority: Optional[Mapping[str, int]] = None,
) -> dict[str, str]:
    """Place configs on live nodes, balanced, moving as few as balance allows.

    ``nodes`` maps live node ids to positive weights; ``current`` is the existing
    placement and may mention dead nodes or configs no longer wanted; ``excluded`` lists,
    per config, nodes that should not take it (ignored when it would leave no eligible
    node).

    :param eligible: per config, the node ids allowed to run it; a config missing from it
        may run anywhere.  Never violated: a config with no live eligible node is left
        out.  Ids of dead nodes and keys of unknown configs are ignored.
    :param capacity: per node, the most configs it may run (an int >= 0); a node missing
        from it is unlimited.  Never exceeded: configs that do not fit are left out.
    :param priority: per config, an int (default 0); when capacity is short, higher
        priorities are placed first.
    :returns: ``config -> node`` for every placed config (every config, without
        ``eligible`` or ``capacity``), or ``{}`` when there are no nodes, in an order
        that does not depend on the input order.  Inputs are not modified.
        `assign_detailed` also says which configs were left out and why.
    :raises ValueError: for a weight that is not finite and > 0, a capacity that is not an
        int >= 0, or a priority that is not an int, naming the node or config.

    See the module docstring for the rules and guarantees.
    """
    placement, _, _ = _assign(
        nodes, configs, current, excluded, eligible, capacity, priority, detailed=False
    )
    return placement


def assign_detailed(
    nodes: Mapping[str, float],
    configs: Iterable[str],
    current: Mapping[str, str],
    excluded: Optional[Mapping[str, AbstractSet[str]]] = None,
    *,
    eligible: Optional[Mapping[str, AbstractSet[str]]] = None,
    capacity: Optional[Mapping[str, int]] = None,
    priority: Optional[Mapping[str, int]] = None,
) -> Placement:
    """Place configs like `assign`, and also report what was left out and the fair shares.

    Takes the same arguments as `assign` and returns a `Placement` whose ``assignment``
    equals what `assign` returns.  Every config is either in ``assignment`` or in
    ``unplaced`` with its reason, never both.
    """
    placement, unplaced, shares = _assign(
        nodes, configs, current, excluded, eligible, capacity, priority, detailed=True
    )
    return Placement(assignment=placement, unplaced=unplaced, shares=shares)
