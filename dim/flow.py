"""The constrained placement: classes of configs, node types and a min-cost flow.

Used by :func:`dim.balance.assign_detailed` when configs require tags, nodes have a
capacity or configs a priority; the model and its terms are described in
:mod:`dim.balance`. Pure, deterministic, no I/O.
"""

from __future__ import annotations

import heapq
import operator
from bisect import bisect_left
from collections import Counter
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from fractions import Fraction
from itertools import compress
from typing import Optional, cast

from dim.shares import _INFINITY, _hash_sorted, _shed


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
