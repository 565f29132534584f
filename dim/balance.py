"""Pure placement of configs on weighted nodes: balanced, sticky and deterministic.

`assign` decides which live node runs each configured instance.  It performs no I/O and
reads no clock or random source, so every process that sees the same inputs computes the
same answer, and a coordinator can recompute it at will.

Algorithm
---------
1. *Keep what may stay.*  A current placement survives only if its node is live, its
   config is still wanted and no exclusion forbids the pair.  Exclusions naming no live
   node are ignored, and so are exclusions naming every live node (there would be nowhere
   to go).  The surviving placements give each node its *kept* count.
2. *Quotas by weighted largest remainder.*  With ``W`` the sum of weights and ``T`` the
   number of configs, node ``i`` is owed exactly ``T * w_i / W``.  Each node gets the floor
   of that share and the ``R`` units left over go to nodes whose share has a fractional
   part, preferring (a) nodes keeping more than their floor, since the unit saves a move
   there, then (b) the larger fractional part, then (c) the CRC-32 of the node id.  Shares
   are computed with integers (weights scaled to a common denominator), so float rounding
   can never make the quotas sum to anything but ``T``.
3. *Shed surplus.*  A node keeping more than its quota keeps the configs whose
   CRC-32 of ``"config\\0node"`` is highest and releases the rest.
4. *Fill free room.*  Released, orphaned, excluded and new configs are placed.  Configs
   with an exclusion go first, one by one, to the eligible node with the most room (ties
   by the pair hash).  If every eligible node is full, the eligible node with the fewest
   configs per unit of weight takes it and releases one of its unrestricted configs (the
   lowest pair hash) into the pool, which keeps balance; only if it has none to release
   does it exceed its quota.  The remaining configs are sorted by the CRC-32 of their key
   and zipped against a list of free slots: nodes ordered by the CRC-32 of their id, each
   repeated as many times as it has room.

Guarantees
----------
* Balance per unit of weight: each node receives the floor or the ceiling of its exact
  share; with equal weights, counts differ by at most one.  Exclusions can break this
  only when a node must exceed its quota because it holds nothing it could hand over.
* Minimal moves: without exclusions, a config moves only if its node is gone or over
  quota.  Among all quota vectors of floors and ceilings, step 2 picks one minimising
  ``sum(max(0, kept_i - quota_i))``, so no balanced placement moves fewer configs, and
  feeding a result back in moves nothing (idempotence).  A config also moves when an
  exclusion forbids its node, and each excluded config that finds its eligible nodes
  full may cost one more move: the swap that keeps balance.
* Determinism: every tie is broken by CRC-32 and then by the string itself, never by
  Python's per-process salted ``hash()`` or by input iteration order; the returned dict
  also iterates in an order independent of the input order.
* Complexity: ``O(M log M + N log N + E * (N + M / N))`` time and ``O(M + N)`` memory
  for ``M`` configs, ``N`` nodes and ``E`` configs that need placing under an exclusion
  (rare; each scans the nodes and, when swapping, one node's configs).
"""

from __future__ import annotations

import math
import zlib
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from fractions import Fraction

__all__ = ["assign", "fair_bounds", "moves", "quotas"]


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


def _place_restricted(
    unplaced: list[str],
    banned: Mapping[str, AbstractSet[str]],
    node_order: list[str],
    held: dict[str, list[str]],
    room: dict[str, int],
    weights: Mapping[str, int],
    result: dict[str, str],
) -> list[str]:
    """Place the unplaced configs that some live nodes must not take; return the rest.

    Each restricted config, in hash order, goes to the eligible node with the most room
    (ties to the higher pair hash).  If every eligible node is full, it goes to the one
    with the fewest configs per unit of weight (ties to the higher pair hash), and that
    node releases its unrestricted config with the lowest pair hash to make room.  The
    released config then fills a slot on a node the restricted one could not use, so
    balance survives at the price of one move, which the next round would otherwise make
    anyway (the node would be over quota).  Only if the node holds nothing releasable
    does it go over quota.  ``held``, ``room`` and ``result`` are updated in place;
    released configs are returned with the unrestricted ones for the caller to place.

    Every restricted config scans all nodes; that is acceptable because exclusions are
    a rare cool-down, and it keeps the common path linear.
    """
    free: list[str] = []
    released = False
    for config in unplaced:
        refused = banned.get(config)
        if refused is None:
            free.append(config)
            continue
        eligible = [node for node in node_order if node not in refused]
        target = max(eligible, key=lambda node: (room[node], _pair_hash(config, node), node))
        if room[target] <= 0:
            # Fractions compare loads exactly; float ratios could tie or invert.
            target = min(
                eligible,
                key=lambda node: (
                    Fraction(len(held[node]), weights[node]),
                    -_pair_hash(config, node),
                    node,
                ),
            )
            releasable = [other for other in held[target] if other not in banned]
            if releasable:
                victim = min(releasable, key=lambda other: (_pair_hash(other, target), other))
                held[target].remove(victim)
                free.append(victim)
                room[target] += 1
                released = True
        held[target].append(config)
        room[target] -= 1
        result[config] = target
    # Keep the zip input in hash order so the result does not depend on release order.
    return _hash_sorted(free) if released else free


def assign(
    nodes: Mapping[str, float],
    configs: Iterable[str],
    current: Mapping[str, str],
    excluded: Mapping[str, AbstractSet[str]] | None = None,
) -> dict[str, str]:
    """Place every config on a live node, moving as few as balance allows.

    ``nodes`` maps live node ids to positive weights; ``current`` is the existing
    placement and may mention dead nodes or configs no longer wanted; ``excluded`` lists,
    per config, nodes that must not take it.  Returns ``config -> node`` for every
    config, or ``{}`` when there are no nodes.  Inputs are not modified.  See the module
    docstring for the rules and guarantees.
    """
    if not nodes:
        return {}
    weights = _integer_weights(nodes)
    # Walking configs in hash order makes every later list (kept, released, unplaced)
    # come out already ordered, and makes the result independent of input order.
    ordered = _hash_sorted(configs)
    if not ordered:
        return {}
    node_order = sorted(nodes, key=_order_key)

    banned: dict[str, frozenset[str]] = {}
    if excluded:
        for config, refused in excluded.items():
            live_forbidden = frozenset(node for node in refused if node in weights)
            # An exclusion covering every live node cannot be honoured; dropping it
            # (rather than leaving the config unplaced) keeps the service running.
            if live_forbidden and len(live_forbidden) < len(weights):
                banned[config] = live_forbidden

    held: dict[str, list[str]] = {node: [] for node in node_order}
    unplaced: list[str] = []
    # Every config enters ``result`` now, in hash order; later assignments only update
    # values, which keeps that order without building a second dict at the end.
    result: dict[str, str] = {}
    for config in ordered:
        node = current.get(config)
        if node is not None and node in held:
            forbidden = banned.get(config) if banned else None
            if forbidden is None or node not in forbidden:
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

    room = {node: quota[node] - len(held[node]) for node in node_order}
    free = (
        _place_restricted(unplaced, banned, node_order, held, room, weights, result)
        if banned
        else unplaced
    )

    # Positive rooms sum to at least len(free): before the restricted pass they sum to
    # len(unplaced), and each restricted config either used one unit of room, swapped
    # with a released config, or overloaded a node without using any.
    slots: list[str] = []
    for node in node_order:
        if room[node] > 0:
            slots.extend([node] * room[node])
    for config, node in zip(free, slots):
        result[config] = node
    return result
