"""Hashing, integer weights and quotas: the arithmetic under :mod:`dim.balance`.

Pure, deterministic, no I/O: every process computes the same numbers from the same
inputs. The terms (weights, quotas, fair bounds) are defined in :mod:`dim.balance`.
"""

from __future__ import annotations

import math
import zlib
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Mapping
from fractions import Fraction

REASON_INELIGIBLE = "ineligible"
"""Why a config is unplaced: no live node is eligible to run it (or no node is live)."""

REASON_CAPACITY = "capacity"
"""Why a config is unplaced: its eligible nodes are full with configs ranked ahead of it."""

# Larger than any distance in the flows below (they are bounded by a few times the
# number of configs), and an int, so distances stay exact.
_INFINITY = 1 << 62


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
