"""The leader's rules (protocol.rst, section 4): membership and configs in, a change set
out. No Redis, no threads, no clock.

The leader loop (:mod:`dim.leader`) is the shell around this module: it reads the
membership and the claims it needs (:func:`claims_to_read` says which), calls
:func:`plan`, writes the :class:`Change` with one script and, when the write went
through, keeps the :class:`Plan`'s outcome as the state of its epoch (:class:`Written`).

Reading order: :func:`split_failures` (which nodes a config must avoid, which failure
records expired), :func:`place` (the balanced placement, through :mod:`dim.balance`),
:func:`pace` (moves held back by ``max_concurrent_moves`` or ``rebalance_delay``), then
:func:`change_set` (what to write so that Redis holds the new placement).
:func:`census` counts the cluster for the metrics.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Optional

import attrs

from dim import balance
from dim.change import Change
from dim.configs import Config
from dim.constraints import eligible_nodes, format_tags
from dim.protocol import absent_field, split_failure, static_field
from dim.shares import _pair_hash

#: Why a config has no place (``unplaced`` hash, status, ``CONFIGS_UNPLACED``).
NO_LIVE_NODE = "no live node"
WAITS_FOR_CAPACITY = "waits for capacity"


def debounce_ends(
    delay: float, burst_since: Optional[float], quiet_since: float
) -> Optional[float]:
    """When the current burst of membership changes stops holding moves back: ``delay``
    after the last change, at most ten delays after the first (None: nothing waits)."""
    if not delay or burst_since is None:
        return None
    return min(quiet_since + delay, burst_since + 10 * delay)


@attrs.frozen
class Members:
    """The membership as one tick of the leader sees it.

    :ivar live: the nodes that may take configs -> their weight (draining nodes and a
        leaving leader are not among them).
    :ivar dead: members whose heartbeat lapsed.
    :ivar holding: live nodes that give their configs up but still run them until they
        move (draining nodes, the leader on a graceful stop): their desired sets shrink,
        they are not forgotten.
    :ivar absent: static nodes gone but within their rejoin grace: their configs wait.
    :ivar now_ms: the server's time (failure records are stamped with it).
    :ivar failures: ``"<node> <config>"`` -> server ms until which that node must not
        get that config again.
    :ivar tags: node -> its tags; :ivar capacity: node -> how many configs it takes.
    """

    live: Mapping[str, float]
    dead: Sequence[str] = ()
    holding: frozenset[str] = frozenset()
    absent: frozenset[str] = frozenset()
    now_ms: int = 0
    failures: Mapping[str, int] = attrs.field(factory=dict)
    tags: Mapping[str, frozenset[str]] = attrs.field(factory=dict)
    capacity: Mapping[str, int] = attrs.field(factory=dict)


@attrs.frozen
class Wanted:
    """The configs and what each requires: tags, and priority when capacity is short."""

    configs: Mapping[str, Config]
    required: Mapping[str, frozenset[str]] = attrs.field(factory=dict)
    priority: Mapping[str, int] = attrs.field(factory=dict)


@attrs.frozen
class Written:
    """What the leader wrote in its epoch (its cache: nobody else writes while it holds).

    :ivar assignment: config -> node.
    :ivar configs: config -> its JSON as stored.
    :ivar live: the live nodes of the last write -> weight.
    :ivar unplaced: config -> why it had no place.
    :ivar absent_since: static node gone -> server ms first seen gone (to write).
    :ivar absent_written: what the control hash holds of those.
    :ivar forget_static: static names whose grace ended (to delete).
    """

    assignment: Mapping[str, str] = attrs.field(factory=dict)
    configs: Mapping[str, str] = attrs.field(factory=dict)
    live: Mapping[str, float] = attrs.field(factory=dict)
    unplaced: Mapping[str, str] = attrs.field(factory=dict)
    absent_since: Mapping[str, int] = attrs.field(factory=dict)
    absent_written: Mapping[str, int] = attrs.field(factory=dict)
    forget_static: frozenset[str] = frozenset()


@attrs.frozen
class Pacing:
    """How fast moves of running instances may go.

    :ivar limit: ``max_concurrent_moves`` (None: no limit).
    :ivar quiet: False while ``rebalance_delay`` holds moves back after a membership change.
    :ivar moving: config -> target of the paced moves still in flight.
    """

    limit: Optional[int] = None
    quiet: bool = True
    moving: Mapping[str, str] = attrs.field(factory=dict)


@attrs.frozen
class Plan:
    """The outcome of one planning step.

    :ivar assignment: the new placement (config -> node).
    :ivar unplaced: config -> why it has no place.
    :ivar change: what to write.
    :ivar moving: the paced moves in flight after this step.
    :ivar held_back: how many moves wait for room or for quiet.
    :ivar moved: configs that go from a live node to another.
    :ivar placed: configs that get a node and had none that runs them.
    """

    assignment: dict[str, str]
    unplaced: dict[str, str]
    change: Change
    moving: dict[str, str]
    held_back: int
    moved: int
    placed: int


def split_failures(
    failures: Mapping[str, int], live: Mapping[str, float], now_ms: int
) -> tuple[dict[str, set[str]], list[str]]:
    """(config -> nodes it must avoid, failure records that expired or whose node left)."""
    excluded: dict[str, set[str]] = {}
    expired = []
    for field, until in failures.items():
        failed_node, ckey = split_failure(field)
        if until <= now_ms or failed_node not in live:
            expired.append(field)
        else:
            excluded.setdefault(ckey, set()).add(failed_node)
    return excluded, expired


def claims_to_read(
    wanted: Wanted, members: Members, written: Written, grace: bool, pacing: Pacing
) -> list[str]:
    """The configs whose claim holder the plan needs: configs whose node is gone (a new
    leader places them where they are claimed), every config in a reset window (the
    placement follows the claims), and the paced moves in flight (have they arrived?)."""
    live = members.live
    assignment = written.assignment
    orphans = [
        c
        for c in wanted.configs
        if assignment.get(c) not in members.absent and (grace or assignment.get(c) not in live)
    ]
    named = set(orphans)
    return orphans + [c for c in pacing.moving if c not in named]


def place(
    wanted: Wanted,
    members: Members,
    to_place: Sequence[str],
    current: Mapping[str, str],
    excluded: Mapping[str, set[str]],
) -> tuple[dict[str, str], dict[str, str]]:
    """The balanced placement, and why each config left out could not be placed."""
    live = members.live
    if not live:
        return {}, {}  # nothing runs anywhere: not a constraint to report
    capacity = {n: members.capacity[n] for n in live if n in members.capacity}
    if not (wanted.required or wanted.priority or capacity):
        return balance.assign(live, to_place, current, excluded), {}
    placing = set(to_place)
    required = {c: r for c, r in wanted.required.items() if c in placing}
    eligible = eligible_nodes(required, {n: members.tags.get(n, frozenset()) for n in live})
    result = balance.assign_detailed(
        live,
        to_place,
        current,
        excluded,
        eligible=eligible or None,
        capacity=capacity or None,
        priority={c: p for c, p in wanted.priority.items() if c in placing} or None,
    )
    reasons = {}
    for ckey, why in result.unplaced.items():
        if why == balance.REASON_CAPACITY:
            reasons[ckey] = WAITS_FOR_CAPACITY
        elif ckey in required:
            reasons[ckey] = f"needs tags {format_tags(required[ckey])}"
        else:
            reasons[ckey] = NO_LIVE_NODE
    return dict(result.assignment), reasons


def pace(
    new: dict[str, str],
    old: Mapping[str, str],
    members: Members,
    pacing: Pacing,
    holders: Mapping[str, tuple[str, int]],
    exclude: Optional[str],
) -> tuple[dict[str, str], int]:
    """Hold back moves of running instances beyond the limit, or all of them while the
    membership is not quiet (in place, on ``new``); returns (moves in flight, held back).

    A held-back config stays where it runs; the leader plans again every tick until
    nothing waits, and the sticky, deterministic assignment picks the same targets
    again. Configs that run nowhere, and moves off a leaving leader, never wait. A move
    in flight has arrived once its target holds the claim (``holders``)."""
    live = members.live
    moves = [
        c
        for c, target in new.items()
        if (source := old.get(c)) is not None
        and source != target
        and source != exclude
        and (source in live or source in members.holding)
    ]
    moving = dict(pacing.moving)
    if not moves and not moving:
        return {}, 0
    budget = len(moves) if pacing.quiet else 0
    if pacing.limit is not None:
        for ckey, target in list(moving.items()):
            holder = holders.get(ckey)
            if new.get(ckey) != target or target not in live or (holder and holder[0] == target):
                del moving[ckey]  # arrived, or no longer applies
        budget = min(budget, max(0, pacing.limit - len(moving)))
    moves.sort(key=lambda c: _pair_hash(c, new[c]))
    for ckey in moves[budget:]:
        new[ckey] = old[ckey]
    if pacing.limit is not None:
        for ckey in moves[:budget]:
            moving[ckey] = new[ckey]
    return moving, len(moves) - budget


def change_set(
    wanted: Wanted,
    members: Members,
    written: Written,
    new: Mapping[str, str],
    unplaced: Mapping[str, str],
    expired: Sequence[str],
) -> Change:
    """What to write so that Redis holds ``new``: the assignment entries, every desired
    set that gains or loses a config, the configs' JSON, and the bookkeeping."""
    old = written.assignment
    live = members.live
    holding = members.holding
    assign = {c: n for c, n in new.items() if old.get(c) != n}
    unassign = [c for c in old if c not in new]
    add: dict[str, list[str]] = {}
    rem: dict[str, list[str]] = {}
    # a node that (re)joined gets its whole share written again: a static node back
    # from its grace finds the configs it had, though its desired set was deleted
    for ckey, target in new.items():
        if target not in written.live and target in live and ckey not in assign:
            add.setdefault(target, []).append(ckey)
    for ckey, target in assign.items():
        add.setdefault(target, []).append(ckey)
        previous = old.get(ckey)
        if previous is not None and (previous in live or previous in holding):
            rem.setdefault(previous, []).append(ckey)
    for ckey in unassign:
        previous = old[ckey]
        if previous in live or previous in holding:
            rem.setdefault(previous, []).append(ckey)
    gone = set(members.dead) | {n for n in old.values() if n not in live}
    return Change(
        assign=assign,
        unassign=unassign,
        configs={
            c: cfg.json for c, cfg in wanted.configs.items() if written.configs.get(c) != cfg.json
        },
        drop_configs=[c for c in written.configs if c not in wanted.configs],
        add=add,
        rem=rem,
        drop_nodes=sorted(gone - set(live) - set(holding)),
        drop_failures=list(expired),
        control_set={
            absent_field(n): str(since)
            for n, since in written.absent_since.items()
            if written.absent_written.get(n) != since
        },
        control_del=sorted(
            [static_field(n) for n in written.forget_static]
            + [absent_field(n) for n in written.absent_written if n not in written.absent_since]
        ),
        unplaced={c: r for c, r in unplaced.items() if written.unplaced.get(c) != r},
        placeable=[c for c in written.unplaced if c not in unplaced],
    )


def differ(configs: Mapping[str, Config], written: Mapping[str, str]) -> bool:
    """Whether ``configs`` differ from the configs' JSON the leader wrote."""
    if len(configs) != len(written):
        return True
    return any(written.get(c) != cfg.json for c, cfg in configs.items())


def shares(assignment: Mapping[str, str], nodes: Sequence[str]) -> dict[str, set[str]]:
    """Each of ``nodes`` -> the configs ``assignment`` gives it (what its desired set
    should hold)."""
    out: dict[str, set[str]] = {n: set() for n in nodes}
    for ckey, target in assignment.items():
        out.setdefault(target, set()).add(ckey)
    return out


def repair(
    assignment: Mapping[str, str],
    expected: Mapping[str, set[str]],
    stored: Mapping[str, str],
    desired: Mapping[str, set[str]],
) -> Change:
    """What to write so that Redis holds the leader's placement again: the assignment
    entries and the desired sets (of the nodes of ``expected``) that differ.

    :param assignment: the leader's placement; ``expected``: its :func:`shares`.
    :param stored: the assignment as Redis holds it; ``desired``: the desired sets.
    """
    add: dict[str, list[str]] = {}
    rem: dict[str, list[str]] = {}
    for target, want in expected.items():
        have = desired.get(target, set())
        if want - have:
            add[target] = sorted(want - have)
        if have - want:
            rem[target] = sorted(have - want)
    return Change(
        assign={c: n for c, n in assignment.items() if stored.get(c) != n},
        unassign=sorted(c for c in stored if c not in assignment),
        add=add,
        rem=rem,
    )


def plan(
    wanted: Wanted,
    members: Members,
    written: Written,
    holders: Mapping[str, tuple[str, int]],
    *,
    grace: bool = False,
    pacing: Pacing = Pacing(),
    exclude: Optional[str] = None,
) -> Plan:
    """One planning step: where every config should run, and what to write for it.

    :param holders: config -> (node, token) of its claim, for (at least) the configs
        :func:`claims_to_read` names.
    :param grace: a reset window is open: place only what live nodes claim back.
    :param exclude: the leader itself on a graceful stop (its configs move off at once).
    """
    live = members.live
    excluded, expired = split_failures(members.failures, live, members.now_ms)
    current = {c: n for c, n in written.assignment.items() if c in wanted.configs}
    # configs of a static node within its rejoin grace stay assigned to it
    held = {c: n for c, n in current.items() if n in members.absent}
    # configs whose node is gone are placed where they are claimed, if anywhere (a new
    # leader); during a reset window every config follows its claim, because the
    # assignment may be older than the claims nodes take back
    for ckey in wanted.configs:
        if ckey not in held and (grace or current.get(ckey) not in live):
            holder = holders.get(ckey)
            if holder is not None and holder[0] in live:
                current[ckey] = holder[0]
    if grace:
        to_place = [c for c in wanted.configs if current.get(c) in live]
    else:
        to_place = [c for c in wanted.configs if c not in held]
    new, unplaced = place(wanted, members, to_place, current, excluded)
    new.update(held)
    old = written.assignment
    moving, held_back = pace(new, old, members, pacing, holders, exclude)
    change = change_set(wanted, members, written, new, unplaced, expired)
    moved = sum(1 for c in change.assign if c in old and old[c] in live)
    return Plan(
        assignment=new,
        unplaced=unplaced,
        change=change,
        moving=moving,
        held_back=held_back,
        moved=moved,
        placed=len(change.assign) - moved,
    )


def summary(unplaced: Mapping[str, str]) -> str:
    """'2 need tags gpu, 1 waits for capacity' (for the log)."""
    counts: dict[str, int] = {}
    for reason in unplaced.values():
        counts[reason] = counts.get(reason, 0) + 1
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))


@attrs.frozen
class Census:
    """The cluster as its leader counts it (``CLUSTER_COUNTED``, the metrics).

    :ivar nodes: live members (draining ones included).
    :ivar configs: the configs the leader placed or found no place for.
    :ivar running: configs whose instance runs, from what the live nodes report with
        their heartbeats, each node counting for at most what it is assigned (never
        more than ``configs``).
    :ivar not_running: configs whose instance runs nowhere (``configs - running``):
        unplaceable ones, creates that fail or are still in progress, the share of a
        node that died, an instance between its old and its new owner.
    :ivar unplaceable: configs no live node may take (required tags, capacity).
    :ivar pending_handoff: instances that nodes still have to start to run what they
        are assigned: for each node, what it is assigned beyond what it runs (a node
        that is gone runs nothing).
    """

    nodes: int
    configs: int
    running: int
    not_running: int
    unplaceable: int
    pending_handoff: int

    def as_data(self) -> dict[str, int]:
        return attrs.asdict(self)


def census(
    configs: Collection[str],
    assignment: Mapping[str, str],
    unplaced: Mapping[str, str],
    running: Mapping[str, int],
) -> Census:
    """Count the cluster from the leader's placement and each live node's running count.

    Counts, not names: a node that starts a config it was given while it still runs one
    that moves away shows no handoff until it stops the old one. A node counts as running
    at most what it is assigned: what it runs beyond that is on its way to another node,
    and counts once that node runs it. Reports are a heartbeat apart, so the old owner's
    count from before a handoff and the new owner's from after would otherwise count one
    instance twice, and could hide a config that runs nowhere.

    :param configs: the configs the leader knows.
    :param assignment: config -> node, as the leader wrote it.
    :param unplaced: config -> why it has no place.
    :param running: each live node -> the instances it reported running.
    """
    assigned: dict[str, int] = {}
    for ckey, target in assignment.items():
        if ckey in configs:
            assigned[target] = assigned.get(target, 0) + 1
    up = min(len(configs), sum(min(n, assigned.get(node, 0)) for node, n in running.items()))
    return Census(
        nodes=len(running),
        configs=len(configs),
        running=up,
        not_running=len(configs) - up,
        unplaceable=sum(1 for c in unplaced if c in configs),
        pending_handoff=sum(max(0, n - running.get(node, 0)) for node, n in assigned.items()),
    )
