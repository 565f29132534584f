"""One leader write: the change set, what it changes in each node's share, and how a
large one is cut into parts (protocol.rst, section 4). No Redis, no threads, no clock.

:func:`dim.plan.plan` produces a :class:`Change`; :func:`deltas` says what it changes in
each node's share (for ``READ_DESIRED`` and the ``assigned`` hints); :func:`split` cuts a
change too large for one script into parts that each leave Redis consistent.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping
from typing import Any, Optional

import attrs


@attrs.frozen
class Change:
    """One leader write, as the leader-write script reads it (JSON, these field names).

    :ivar assign: config -> its new node.
    :ivar unassign: configs that leave the placement.
    :ivar configs: config -> its JSON, where it changed.
    :ivar drop_configs: configs removed.
    :ivar add: node -> configs to add to its desired set.
    :ivar rem: node -> configs to remove from its desired set.
    :ivar drop_nodes: members to forget (gone, and not holding anything back).
    :ivar drop_failures: failure records that expired.
    :ivar control_set: control hash fields to set (``absent <node>``).
    :ivar control_del: control hash fields to delete.
    :ivar unplaced: config -> why it has no place, where that changed.
    :ivar placeable: configs that have a place again.
    """

    assign: dict[str, str] = attrs.field(factory=dict)
    unassign: list[str] = attrs.field(factory=list)
    configs: dict[str, str] = attrs.field(factory=dict)
    drop_configs: list[str] = attrs.field(factory=list)
    add: dict[str, list[str]] = attrs.field(factory=dict)
    rem: dict[str, list[str]] = attrs.field(factory=dict)
    drop_nodes: list[str] = attrs.field(factory=list)
    drop_failures: list[str] = attrs.field(factory=list)
    control_set: dict[str, str] = attrs.field(factory=dict)
    control_del: list[str] = attrs.field(factory=list)
    unplaced: dict[str, str] = attrs.field(factory=dict)
    placeable: list[str] = attrs.field(factory=list)

    def __bool__(self) -> bool:
        return any(attrs.astuple(self, recurse=False))

    def entries(self) -> int:
        """How many placement entries it touches (for the repair log)."""
        return (
            len(self.assign)
            + len(self.unassign)
            + sum(len(v) for v in self.add.values())
            + sum(len(v) for v in self.rem.values())
        )

    def size(self) -> int:
        """How many entries the write script applies (what its run time grows with)."""
        return (
            self.entries()
            + len(self.configs)
            + len(self.drop_configs)
            + len(self.drop_nodes)
            + len(self.drop_failures)
            + len(self.control_set)
            + len(self.control_del)
            + len(self.unplaced)
            + len(self.placeable)
        )

    def as_json(self) -> dict[str, Any]:
        return attrs.asdict(self, recurse=False)


def touched(change: Change, assignment: Mapping[str, str]) -> set[str]:
    """The nodes whose share ``change`` alters: desired-set entries added or removed,
    and the nodes (in ``assignment``, the placement after the write) of the configs
    whose content or assignment entry it changes."""
    nodes = set(change.add) | set(change.rem) | set(change.assign.values())
    nodes.update(assignment[c] for c in change.configs if c in assignment)
    return nodes


def split(
    change: Change,
    limit: int,
    max_bytes: int = 0,
    assignment: Optional[Mapping[str, str]] = None,
) -> list[Change]:
    """Cut ``change`` into parts of about ``limit`` entries (:meth:`Change.size`) and at
    most about ``max_bytes`` of config JSON (0: no byte limit), to be written in this
    order, each by its own script (protocol.rst §4.2).

    Everything the change does to one config (its assignment entry, its content, its
    desired-set entries, its unplaced reason) stays in one part, so Redis is consistent
    after each part: a reader sees each config as it was before the change or as it is
    after. What concerns nodes and the control hash (nodes dropped, failure records,
    control fields) is in the last part. A change within both limits is one part.

    Configs are grouped by a node they join or leave, whichever of the two the change
    touches less (the nodes that lose configs to a node that joins, the nodes that
    gain those of a node that leaves), and a config whose content alone changes by its
    node in ``assignment`` (the placement after the change): each node is in few
    parts, so it finds one delta to read rather than several.
    """
    nbytes = sum(len(j) for j in change.configs.values()) if max_bytes > 0 else 0
    if (limit <= 0 or change.size() <= limit) and nbytes <= max(max_bytes, 0):
        return [change]
    limit = limit if limit > 0 else change.size() + 1
    max_bytes = max_bytes if max_bytes > 0 else sum(len(j) for j in change.configs.values()) + 1
    # each config's group: the node it joins or leaves that the change touches least
    load = {n: len(cs) for n, cs in change.add.items()}
    for n, cs in change.rem.items():
        load[n] = load.get(n, 0) + len(cs)
    group: dict[str, str] = {}
    for entries in (change.add, change.rem):
        for n, cs in entries.items():
            for c in cs:
                other = group.get(c)
                if other is None or (load[n], n) < (load[other], other):
                    group[c] = n
    owners = assignment or {}
    for c in change.configs if owners else ():
        if c not in group and c in owners:  # content only: with its node's others
            group[c] = owners[c]
    by_node: dict[str, list[str]] = {}
    for c, n in group.items():
        by_node.setdefault(n, []).append(c)
    order = dict.fromkeys(c for n in sorted(by_node) for c in by_node[n])
    for keys in (change.assign, change.unassign, change.configs, change.drop_configs):
        order.update(dict.fromkeys(keys))
    order.update(dict.fromkeys(change.unplaced))
    order.update(dict.fromkeys(change.placeable))
    # what each config costs: its entries, and the bytes of its JSON
    cost = dict.fromkeys(order, 0)
    for keys in (change.assign, change.unassign, change.configs, change.drop_configs):
        for c in keys:
            cost[c] += 1
    listed: list[Collection[str]] = [change.unplaced, change.placeable]
    for ckeys in [*listed, *change.add.values(), *change.rem.values()]:
        for c in ckeys:
            cost[c] += 1
    size = used = count = 0
    where: dict[str, int] = {}
    for c, weight in cost.items():
        if size >= limit or used >= max_bytes:
            count, size, used = count + 1, 0, 0
        where[c] = count
        size += weight
        used += len(change.configs.get(c, ""))
    parts = [Change() for _ in range(count + 1)]
    for c, n in change.assign.items():
        parts[where[c]].assign[c] = n
    for c, text in change.configs.items():
        parts[where[c]].configs[c] = text
    for c, why in change.unplaced.items():
        parts[where[c]].unplaced[c] = why
    for c in change.unassign:
        parts[where[c]].unassign.append(c)
    for c in change.drop_configs:
        parts[where[c]].drop_configs.append(c)
    for c in change.placeable:
        parts[where[c]].placeable.append(c)
    for field in ("add", "rem"):
        for n, cs in getattr(change, field).items():
            for c in cs:
                getattr(parts[where[c]], field).setdefault(n, []).append(c)
    last = attrs.evolve(
        parts[-1],
        drop_nodes=list(change.drop_nodes),
        drop_failures=list(change.drop_failures),
        control_set=dict(change.control_set),
        control_del=list(change.control_del),
    )
    return [*parts[:-1], last]


def apply(
    parts: Iterable[Change],
    assignment: Mapping[str, str],
    configs: Mapping[str, str],
    unplaced: Mapping[str, str],
) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """The placement, stored configs and unplaced reasons after ``parts`` were written
    over ``assignment``, ``configs`` and ``unplaced`` (the leader's copy after a write
    that stopped part-way: the parts that went through are whole)."""
    assignment, configs, unplaced = dict(assignment), dict(configs), dict(unplaced)
    for part in parts:
        assignment.update(part.assign)
        configs.update(part.configs)
        unplaced.update(part.unplaced)
        for c in part.unassign:
            assignment.pop(c, None)
        for c in part.drop_configs:
            configs.pop(c, None)
        for c in part.placeable:
            unplaced.pop(c, None)
    return assignment, configs, unplaced


def deltas(
    change: Change,
    assignment: Mapping[str, str],
    targets: Iterable[str],
    configs: Optional[Mapping[str, str]] = None,
    limit: int = 0,
) -> dict[str, dict[str, Any]]:
    """What a write changes in each target node's share, as the leader-write script
    stores it for ``READ_DESIRED`` (protocol.rst §4.1): ``a`` configs added to its
    desired set, ``r`` removed, ``u`` configs of its share whose content or assignment
    entry the write changes (a node re-reads those). ``assignment`` is the placement
    after the write; a target with nothing changed gets an empty delta. With
    ``configs`` (config -> JSON after the write), ``h`` holds the delta's inline form
    for the node's hint where it fits in ``limit`` characters (:func:`inline_deltas`)."""
    out: dict[str, dict[str, Any]] = {
        n: {"a": sorted(change.add.get(n, ())), "r": sorted(change.rem.get(n, ())), "u": []}
        for n in targets
    }
    added = {n: set(change.add.get(n, ())) for n in out}
    touched = set(change.configs) | set(change.assign)
    for ckey in sorted(touched):
        node = assignment.get(ckey)
        if node in out and ckey not in added[node]:
            out[node]["u"].append(ckey)
    if configs is not None:
        for node, text in inline_deltas(out, assignment, configs, change.configs, limit).items():
            out[node]["h"] = text
    return out


def inline_deltas(
    deltas: Mapping[str, Mapping[str, Any]],
    assignment: Mapping[str, str],
    configs: Mapping[str, str],
    changed: Collection[str],
    limit: int,
) -> dict[str, str]:
    """For each node whose delta can ride in its ``assigned`` hint, the hint's extra
    fields (``,"a":{ckey: json},"r":{ckey: node or null}``; protocol.rst §4.1), at most
    ``limit`` characters with the ``,"c":[ckey]`` the leader-write script may add. A
    delta stays out (the node reads it) when it changes an assignment entry in place
    (``u`` without new content: a repair) or removes a config that still exists but has
    no node (it may keep running: the node must read where it stands). ``changed``: the
    configs whose content the write changes."""
    out: dict[str, str] = {}
    changed = set(changed)
    for node, delta in deltas.items():
        if len(delta["a"]) + len(delta["u"]) + len(delta["r"]) > limit:
            continue  # each entry takes more than a character: it cannot fit
        if any(c not in changed for c in delta["u"]):
            continue
        if any(c not in configs for c in delta["a"] + delta["u"]):
            continue
        if any(c in configs and c not in assignment for c in delta["r"]):
            continue
        added = {c: configs[c] for c in delta["a"] + delta["u"]}
        moved = {c: assignment.get(c) for c in delta["r"]}
        text = ',"a":' + json.dumps(added, separators=(",", ":"))
        text += ',"r":' + json.dumps(moved, separators=(",", ":"))
        # room for the script to name the added configs another node still holds (its
        # JSON writes each "/" as "\/")
        names = json.dumps(delta["a"], separators=(",", ":")).replace("/", "\\/")
        held = ',"c":' + names if delta["a"] else ""
        if len(text) + len(held) <= limit:
            out[node] = text
    return out
