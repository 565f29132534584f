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

from collections import Counter
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from fractions import Fraction
from itertools import compress
from typing import Optional

import attrs

from dim.flow import _assign_constrained
from dim.shares import (
    REASON_CAPACITY,
    REASON_INELIGIBLE,
    _hash_sorted,
    _integer_weights,
    _order_key,
    _quotas,
    _shares,
    _shed,
    fair_bounds,
    moves,
    quotas,
)

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
