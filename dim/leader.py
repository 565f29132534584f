"""The leader loop: membership watch, ``get_config``, assignment writes.

Only the node whose heartbeat holds the leader key does anything here. Every write goes
through one Lua script that first checks the leader key still holds exactly
``<me>:<epoch>``; when that check fails this node steps down, so a deposed or paused
leader changes nothing.

The leader caches the assignment and configs it wrote during its epoch (nobody else can
write them while the epoch holds), so a rebalance reads only the membership and writes
only what changed: its cost grows with what moves plus the number of nodes, not with
the number of configs. Redis may still lose a write (a failover to a replica that lags,
a node that came back between the leader's read and its write): every
``config_interval`` the leader compares what Redis holds with its copy and repairs the
difference, and after a reset window opens it reloads everything from Redis and
rebuilds the placement from the claims.

The rules are in :mod:`dim.plan`, the configs come from :mod:`dim.configsource`.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from typing import TYPE_CHECKING, Any, Callable, Optional

from dim import announce, plan, writer
from dim import change as change_set
from dim.change import Change
from dim.configs import Config, KeyFunc, Parsed
from dim.configsource import ConfigSource
from dim.constraints import Rules
from dim.errors import ConfigError
from dim.events import Event, EventType
from dim.logs import NodeLog
from dim.loop import Every, Loop
from dim.messages import MAX_MESSAGE_BYTES
from dim.protocol import View, WriteRefused, parse_owner
from dim.roster import Roster

if TYPE_CHECKING:
    from dim.node import Node

log = logging.getLogger(__name__)

# what one get_config call yields: the parsed items, the tags each config requires, the
# priorities, and the configs whose placement rules failed
_Loaded = tuple[Parsed, dict[str, frozenset[str]], dict[str, int], dict[str, ConfigError]]


class LeaderLoop(Loop["Node"]):
    role = "leader"

    def __init__(
        self,
        node: Node,
        get_config: Callable[[], Any],
        key: Optional[KeyFunc],
        rules: Optional[Rules] = None,
    ) -> None:
        super().__init__(node)
        look = functools.partial(Loop.wake, self)  # a get_config call returned: tick now
        self._configs = ConfigSource(
            node.node_id, node.settings, node.clock, node.emit, get_config, key, rules, look
        )
        self._lock = threading.RLock()
        self._log = NodeLog(log, node.node_id, lambda: self._epoch or None)
        self.alive_at = node.clock()
        self._every = Every(node.settings.config_interval, node.clock)
        self._delay = node.settings.rebalance_delay
        self._epoch = 0
        # the membership as the leader's own heartbeat last returned it: (clock, view)
        self._view: Optional[tuple[float, View]] = None
        self._read = True  # read the membership now instead of using the heartbeat's view
        self._paused = False  # an operator paused rebalancing (control hash)
        self._draining: set[str] = set()  # live nodes an operator is draining
        self._reset()

    def _reset(self) -> None:
        self._assignment: dict[str, str] = {}
        self._written: dict[str, str] = {}  # ckey -> config json, as stored
        self._live: dict[str, float] = {}  # node id -> weight
        self._roster = Roster()  # weight, tags, capacity, static name of each node
        self._unplaced: dict[str, str] = {}  # config -> why no node can take it (written)
        self._absent: dict[str, float] = {}  # static node gone -> end of its rejoin grace
        self._absent_since: dict[str, int] = {}  # ... -> server ms it was first seen gone
        self._absent_written: dict[str, int] = {}  # what the control hash holds of those
        self._forget_static: set[str] = set()  # static names whose grace ended
        self._grace_until = 0.0  # a reset window: placement rebuilt from the claims
        self._reset_id = ""  # the reset window this state was loaded for
        self._written_version = 0  # the last version this leader wrote
        self._repair = False  # compare Redis with the cache at the next tick
        self._repair_full = False  # ... entry by entry, not by counts first
        self._dirty = True
        self._wrote = False  # nothing written yet in this epoch
        self._value = ""  # the leader value this state belongs to
        self._compared: Optional[dict[str, Config]] = None  # configs known to be written
        # paced moves: configs moved from one node to another and not yet arrived
        self._moving: dict[str, str] = {}
        self._deferred = False  # some moves wait (pacing or debounce): re-plan each tick
        self._seen_live: Optional[dict[str, float]] = None  # membership at the last tick
        self._quiet_since = 0.0  # when the membership last changed
        self._burst_since: Optional[float] = None  # first change of the current burst
        self._count = True  # count the cluster at the next tick (CLUSTER_COUNTED)

    def wake(self) -> None:
        """Look now, at a freshly read membership (a hint said it changed)."""
        self._read = True
        super().wake()

    def observe(self, view: View, sent_at: float) -> None:
        """The leader's heartbeat brought the membership back: plan with it.

        This is what keeps an idle leader at one round trip per heartbeat: it reads the
        membership itself only when a hint, an election or a missed heartbeat calls for it.
        """
        current = self._view
        if current is None or view.now_ms >= current[1].now_ms:
            self._view = (sent_at, view)
        super().wake()

    def mark_dirty(self) -> None:
        """Re-plan at the next tick even if membership and configs look unchanged.

        For what the leader does not watch itself: a node reporting that it gave up a
        config (the failures hash), and a periodic re-check with every config poll.
        """
        self._dirty = True
        self.wake()

    def request_refresh(self) -> None:
        """Call get_config at the next tick (config_interval job, refresh(), hint)."""
        self._configs.request_refresh()
        super().wake()  # the heartbeat's view of the membership will do

    def tick(self) -> float:
        node = self.node
        self.alive_at = node.clock()
        interval = node.settings.heartbeat_interval
        if self._every.due():
            self._every.ran()
            self._dirty = True  # a periodic full re-plan catches any hint that was lost
            self._repair = True  # and any write Redis lost
            self._configs.request_refresh()
            self._count = True
        if not node.is_leader or node.leaving:
            if self._epoch:
                self._epoch = 0
                self._reset()
            # a follower's loop sleeps: Node.set_leader wakes it when it gains the lead
            return max(interval, self._every.wait())
        with self._lock:
            self._lead(exclude=None)
            if self._count and self._epoch == node.epoch and (self._wrote or self._written):
                self._count_cluster()
        self.alive_at = node.clock()
        # the leader's heartbeat wakes it every interval with a fresh view; this is a
        # fallback for when heartbeats fail
        delay = min(2 * interval, self._every.wait())
        if self._configs.loading:
            delay = min(delay, interval)  # look for the result of get_config
        if self._grace_until:
            delay = min(delay, max(self._grace_until - node.clock(), 0.0))
        settle = plan.debounce_ends(self._delay, self._burst_since, self._quiet_since)
        if settle is not None:
            delay = min(delay, max(settle - node.clock(), 0.0))
        if self._absent:
            delay = min(delay, max(min(self._absent.values()) - node.clock(), 0.0))
        return delay

    def _count_cluster(self) -> None:
        """Count the cluster for CLUSTER_COUNTED's listeners (the metrics): the placement,
        and what the live nodes last reported running (one read every config_interval)."""
        node = self.node
        if node.dispatcher.wants(EventType.CLUSTER_COUNTED):
            running = node.store.running(self._current_view().live())
            counts = plan.census(self._written, self._assignment, self._unplaced, running)
            data = {"epoch": self._epoch, **counts.as_data()}
            node.emit(Event(EventType.CLUSTER_COUNTED, node.node_id, data=data))
            self._count = False  # (kept for a listener added later: no I/O until then)

    def _track_absent(self, live: set[str], view: View) -> None:
        """Static nodes gone with configs assigned: their grace runs from when a leader
        first saw them gone (kept in the control hash, so a new leader does not start
        the grace again)."""
        grace = self.node.settings.rejoin_grace
        now = self.node.clock()
        holders = set(self._assignment.values())
        # a static name that is gone and holds nothing (its grace is over) is forgotten
        stale = {n for n in self._roster.static - live - holders if n not in self._absent}
        if stale - self._forget_static:
            self._forget_static |= stale
            self._dirty = True
        if not grace:
            return
        recorded = view.absent_since
        for node_id in holders - live:
            if node_id in self._roster.static and node_id not in self._absent:
                since = recorded.get(node_id, view.now_ms)
                left = grace - max(0, view.now_ms - since) / 1000
                self._log.info(
                    "static node %s is gone: its configs wait %.3gs for it", node_id, left
                )
                self._absent[node_id] = now + left
                self._absent_since[node_id] = since
                self._dirty = True
        for node_id, until in list(self._absent.items()):
            if node_id in live or node_id not in holders or now >= until:
                del self._absent[node_id]
                self._absent_since.pop(node_id, None)
                self._dirty = True
        for node_id in recorded:
            if node_id not in self._absent:
                self._absent_written.setdefault(node_id, recorded[node_id])  # to delete

    def close(self) -> None:
        """Let the config thread go (a get_config still running is abandoned)."""
        self._configs.close()

    def final_rebalance(self) -> None:
        """On graceful stop: place this node's configs elsewhere before resigning.

        Skipped when the leader is busy for longer than a heartbeat or two: the next
        leader places them instead, a moment later. It waits for no user code."""
        node = self.node
        if not self._lock.acquire(timeout=max(1.0, 2 * node.settings.heartbeat_interval)):
            self._log.warning(
                "leader %s is busy: no final rebalance before it leaves", node.node_id
            )
            return
        try:
            if node.is_leader and self._epoch == node.epoch:
                self._dirty = True
                self._configs.final = True
                self._lead(exclude=node.node_id)
        finally:
            self._configs.final = False
            self._lock.release()

    def _lead(self, exclude: Optional[str]) -> None:
        node = self.node
        store = node.store
        # Everything below works for this one leader value: if the heartbeat moves us to
        # a new epoch meanwhile (Redis lost its data and we won again), the write fails
        # its check instead of publishing a plan made from the old epoch's view.
        value = node.leader_value
        owner = parse_owner(value)
        if value is None or owner is None:
            return
        era = store.era
        if self._epoch != owner[1] or (era.reset_id and era.reset_id != self._reset_id):
            # a new epoch, or Redis lost or rewound data: start from the truth in Redis,
            # then keep our own copy
            self._load_state(value, owner[1])
            if self._configs.good is None:
                self._configs.request_refresh()
        self._configs.collect(self._written)
        if self._configs.good is None and self._configs.loading and not self._written:
            return  # a new service: wait for the first get_config rather than plan nothing
        configs = self._configs.known(self._written)
        view = self._current_view()
        self._roster.static.update(view.static_names)
        if view.paused != self._paused:
            self._paused = view.paused
            self._dirty = True  # resumed: re-plan everything at once
            self._log.warning(
                "rebalancing is %s by an operator", "paused" if view.paused else "resumed"
            )
        if self._paused:
            return  # hold everything where it is; instances still heal where they run
        live_ids = view.live()
        dead = view.dead()
        self._track_absent(set(live_ids), view)
        if exclude is not None and exclude in live_ids:
            live_ids.remove(exclude)
        draining = view.draining & set(live_ids)
        if draining and len(draining) < len(live_ids):
            live_ids = [n for n in live_ids if n not in draining]
        elif draining:
            self._log.warning("every live node is being drained: ignoring the drain")
            draining = set()
        self._draining = draining
        for node_id, info in store.node_infos(self._roster.unknown(live_ids)).items():
            self._roster.learn(node_id, dict(info))
        live = self._roster.live(live_ids)
        self._roster.forget_gone(view.members)
        if self._grace_until:
            if node.clock() >= self._grace_until:
                self._grace_until = 0.0
            # until the grace ends, look for claims that nodes take back every tick
            self._dirty = True
        if live != self._seen_live:
            now = node.clock()
            if self._seen_live is not None:
                self._quiet_since = now
                if self._burst_since is None:
                    self._burst_since = now
            self._seen_live = dict(live)
        if self._deferred:
            self._dirty = True  # moves wait for room or for quiet: look again
        changed_members = live != self._live or bool(dead)
        # compare contents only when get_config produced a new result (O(configs))
        fresh_configs = configs is not self._compared and plan.differ(configs, self._written)
        if self._dirty or changed_members or fresh_configs:
            self._rebalance(configs, live, dead, view, exclude, force=changed_members)
        else:
            self._compared = configs
        if self._repair and self._wrote and not self._grace_until and exclude is None:
            self._repair_placement(live)

    def _current_view(self) -> View:
        """The heartbeat's view if it is recent and nothing asked for a fresh read."""
        node = self.node
        read, self._read = self._read, False
        snapshot = self._view
        if (
            not read
            and snapshot is not None
            and node.clock() - snapshot[0] < 1.5 * node.settings.heartbeat_interval
        ):
            return snapshot[1]
        try:
            view = node.store.leader_read()
        except BaseException:
            self._read = True
            raise
        for node_id, info in (view.infos or {}).items():
            self._roster.learn(node_id, info)
        if snapshot is None or view.now_ms >= snapshot[1].now_ms:
            self._view = (node.clock(), view)
        return view

    def _load_state(self, value: str, epoch: int) -> None:
        """Forget the cache and read the placement back from Redis."""
        node = self.node
        store = node.store
        era = store.era
        self._reset()
        self._epoch = 0  # until loaded: a read that fails here leaves the next tick to read
        self._value = value
        reset_id = era.reset_id
        self._assignment = store.assignment()
        self.alive_at = node.clock()  # each read of a large service takes a while
        self._written = store.configs()
        self.alive_at = node.clock()
        self._unplaced = store.unplaced()  # what the previous leader reported
        if node.settings.max_concurrent_moves is not None and self._assignment:
            # moves a previous leader started and that have not arrived yet
            holders = store.claims(list(self._assignment))
            self._moving = {
                c: n for c, n in self._assignment.items() if c in holders and holders[c][0] != n
            }
        if era.resetting():
            # Redis lost or rewound data: nobody may take a new claim while every node
            # still running an instance takes its claim back; until the window ends the
            # placement follows the claims, and configs nobody claims wait
            self._grace_until = era.reset_until
            self._log.warning(
                "leader %s: placing only what nodes claim back for %.1fs (Redis reset)",
                node.node_id,
                era.reset_until - node.clock(),
            )
        self._epoch, self._reset_id = epoch, reset_id

    def _repair_placement(self, live: dict[str, float]) -> None:
        """Compare what Redis holds of the placement with this leader's copy, and write
        back whatever differs (a write lost in a failover, a node that came back between
        the leader's read and its write). The version and the counts first (they cost
        nothing); the full read only when they differ, or when a write said something
        was kept or its reply was lost."""
        node = self.node
        store = node.store
        self._repair = False
        nodes = sorted(set(live) | set(self._assignment.values()))
        expected = plan.shares(self._assignment, nodes)
        if not self._repair_full:
            stored, size, counts = store.repair_counts(nodes)
            # every write of ours bumps the version in the same step: another version
            # means a write of ours was lost (or another leader wrote)
            ours = not self._written_version or stored == str(self._written_version)
            if (
                ours
                and size == len(self._assignment)
                and all(counts.get(n, 0) == len(expected[n]) for n in nodes)
            ):
                return
        self._repair_full = False
        assignment, desired = store.repair_read(nodes)
        change = plan.repair(self._assignment, expected, assignment, desired)
        wrong = change.entries()
        if not wrong:
            self._forget_unwritten_moves()
            return
        self._log.warning(
            "leader %s: Redis disagrees with the placement on %d entries (a lost write?); "
            "repairing",
            node.node_id,
            wrong,
        )
        targets = set(change.add) | set(change.rem) | set(change.assign.values())
        wrote = self._write(change, self._assignment, targets)
        if wrote.version < 0:
            self._repair = self._repair_full = True  # try again at the next tick
            self._dirty = True
            return
        self._written_version = wrote.version
        self._forget_unwritten_moves()
        if node.node_id in targets:  # its own share changed: no hint tells it
            node.reconciler.wake(read=True)

    def _write(
        self,
        change: Change,
        assignment: dict[str, str],
        targets: set[str],
        configs: Optional[dict[str, str]] = None,
        limit: int = 0,
    ) -> writer.Wrote:
        """Write ``change``: in parts when it is large (:mod:`dim.writer`), each part
        whole, so after a write that stopped part-way this copy takes in those that
        went through and the next tick plans from there."""
        node = self.node

        def progress() -> None:
            self.alive_at = node.clock()  # a long write is not a stuck leader

        wrote = writer.write(
            node.store,
            self._value,
            change,
            assignment,
            targets,
            configs,
            limit,
            self._reset_id,
            progress,
        )
        if wrote.partial:
            self._log.warning(
                "leader %s: a write stopped after %d of %d parts",
                node.node_id,
                len(wrote.applied),
                wrote.parts,
            )
            self._assignment, self._written, self._unplaced = change_set.apply(
                wrote.applied, self._assignment, self._written, self._unplaced
            )
            self._written_version, self._dirty = wrote.written, True
            if node.node_id in targets:  # its own share may have changed: no hint says so
                node.reconciler.wake(read=True)
        if wrote.error is not None:
            # the write may have run though its reply was lost: compare with Redis later
            self._repair = self._repair_full = True
            raise wrote.error
        return wrote

    def _forget_unwritten_moves(self) -> None:
        """Redis holds this leader's placement now: a paced move it does not contain (its
        write failed, or the repair took it back) is not in flight, and must not hold
        the other moves back for ever."""
        self._moving = {c: t for c, t in self._moving.items() if self._assignment.get(c) == t}

    def _rebalance(
        self,
        configs: dict[str, Config],
        live: dict[str, float],
        dead: list[str],
        view: View,
        exclude: Optional[str],
        force: bool,
    ) -> None:
        """Read what the plan needs, plan (:func:`dim.plan.plan`), write, keep the result."""
        node = self.node
        store = node.store
        if live and self._configs.needs_rules(configs):
            # configs read back from Redis (no good get_config result yet in this process)
            self._configs.stored_rules(configs)
        members = plan.Members(
            live=live,
            dead=dead,
            holding=frozenset(self._draining | ({exclude} if exclude is not None else set())),
            absent=frozenset(self._absent),
            now_ms=view.now_ms,
            failures=view.failures,
            tags=self._roster.tags,
            capacity=self._roster.capacity,
        )
        wanted = plan.Wanted(configs, self._configs.required, self._configs.priority)
        written = plan.Written(
            assignment=self._assignment,
            configs=self._written,
            live=self._live,
            unplaced=self._unplaced,
            absent_since=self._absent_since,
            absent_written=self._absent_written,
            forget_static=frozenset(self._forget_static),
        )
        settle = plan.debounce_ends(self._delay, self._burst_since, self._quiet_since)
        quiet = settle is None or node.clock() >= settle
        if settle is not None and quiet:
            self._burst_since = None  # quiet long enough: this burst is over
        pacing = plan.Pacing(node.settings.max_concurrent_moves, quiet, self._moving)
        grace = bool(self._grace_until)
        wanted_claims = plan.claims_to_read(wanted, members, written, grace, pacing)
        holders = store.claims(wanted_claims) if wanted_claims else {}
        self.alive_at = node.clock()  # each step of a long tick shows the loop is alive
        step = plan.plan(
            wanted, members, written, holders, grace=grace, pacing=pacing, exclude=exclude
        )
        self.alive_at = node.clock()
        new, unplaced, change = step.assignment, step.unplaced, step.change
        old = self._assignment
        if step.held_back and not self._deferred:
            self._log.info(
                "holding back %d moves (%s)",
                step.held_back,
                "membership still changing" if not quiet else "max_concurrent_moves",
            )
        self._deferred = step.held_back > 0
        # the moves started now are in flight from here on, whatever the write's reply
        # says: a write whose reply is lost may have gone through
        self._moving = step.moving
        if grace and not new and not old:
            # nothing claimed yet: publish nothing until the grace ends, so no node
            # believes it is settled while configs are held back
            return
        if not force and self._wrote and not change:
            self._live = live
            self._dirty = False
            self._compared = configs
            return  # nothing to say: no version bump, no hint
        targets = set(change.add) | set(change.rem)
        targets.update(new[c] for c in change.configs if c in new)
        # a node placed for the first time learns that the leader has seen it, even with
        # nothing to run (Manager.start(wait=True) waits for that)
        targets.update(n for n in live if n not in self._live)
        limit = MAX_MESSAGE_BYTES - 120 - len(json.dumps(node.node_id))
        jsons = {c: cfg.json for c, cfg in configs.items()}
        wrote = self._write(change, new, targets, jsons, limit)
        version, kept = wrote.version, list(wrote.kept)
        if version == WriteRefused.DEPOSED:
            self._log.warning(
                "node %s: leader write refused (epoch %d is over)", node.node_id, self._epoch
            )
            if node.leader_value == self._value:
                node.set_leader(None)  # deposed: step down
            self._epoch = 0  # a newer epoch of ours (if any) starts from Redis again
            self._reset()
            return
        if version < 0:
            # a reset window we had not heard of (the reply told us: the next tick
            # reloads), or a request that arrived too late: nothing was written
            self._log.warning(
                "node %s: leader write refused (%s)",
                node.node_id,
                "Redis reset" if version == WriteRefused.RESET else "late request",
            )
            self._forget_unwritten_moves()  # nothing was written: none of them started
            self._dirty = True
            self._read = True
            return
        if kept:
            # nodes that came back between our read and this write keep their entries;
            # look at the membership again (their desired sets are repaired later)
            self._log.info("nodes %s came back before the write: re-planning", kept)
            self._read = True
            self._repair = self._repair_full = True
        self._written_version = version
        # the leader hears no hint of its own: pick up its own share now, not at the next
        # heartbeat (that delay was most of a graceful join or leave)
        if node.node_id in targets:  # its own share changed: no hint tells it
            node.reconciler.wake(read=True)
        self._wrote = True
        if unplaced != self._unplaced:
            announce.unplaced(node, self._log, unplaced, configs)
        self._unplaced = unplaced
        self._roster.static -= self._forget_static
        self._forget_static = set()
        self._absent_written = dict(self._absent_since)
        self._compared = configs
        self._assignment = new
        self._written = {c: cfg.json for c, cfg in configs.items()}
        self._live = live
        self._dirty = False
        announce.applied(node, self._log, version, step, len(live), len(configs), self._grace_until)
