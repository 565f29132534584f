"""What the leader knows of each node: weight, tags, capacity, static name.

Pure: the leader feeds it the descriptions it reads (``node:<id>``, protocol.rst §1.1)
and the static names its heartbeat brings back (the control hash, §1.2), and asks it
for the weights of the live nodes.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Optional

from dim.constraints import parse_capacity, parse_tags, parse_weight


class Roster:
    """The description fields the placement needs, per node; one writer: the leader."""

    def __init__(self) -> None:
        self.weights: dict[str, float] = {}
        self.tags: dict[str, frozenset[str]] = {}  # node -> its tags (if any)
        self.capacity: dict[str, int] = {}  # node -> its capacity (if limited)
        self.static: set[str] = set()  # nodes with a static name (they may come back)

    def unknown(self, node_ids: Iterable[str]) -> list[str]:
        """The nodes whose description was never read."""
        return [n for n in node_ids if n not in self.weights]

    def learn(self, node_id: str, info: Mapping[str, Optional[str]]) -> None:
        """Remember a node's weight, static name, tags and capacity (its description)."""
        self.weights[node_id] = parse_weight(info.get("weight"))
        if info.get("static") == "1":
            self.static.add(node_id)
        tags = parse_tags(info.get("tags"))
        if tags:
            self.tags[node_id] = tags
        capacity = parse_capacity(info.get("capacity"))
        if capacity is not None:
            self.capacity[node_id] = capacity

    def live(self, node_ids: Iterable[str]) -> dict[str, float]:
        """Node -> weight, for the placement (1.0 for a node not described)."""
        return {n: self.weights.get(n, 1.0) for n in node_ids}

    def forget_gone(self, members: Collection[str]) -> None:
        """Drop nodes long gone, once they outnumber the members (bounded memory)."""
        if len(self.weights) > 2 * len(members) + 16:
            self.weights = {n: w for n, w in self.weights.items() if n in members}
            self.tags = {n: t for n, t in self.tags.items() if n in members}
            self.capacity = {n: c for n, c in self.capacity.items() if n in members}
