"""The checker: the invariants of one run, checked over its ledger records (pure).

:func:`check` reads every record of one run (the nodes' ledgers and the harness's own)
and returns a :class:`Report`: (1) overlaps, one config alive twice at once, on two
nodes or on one (a woken SIGSTOPped process is measured separately, and so is an
overlap that a ``disconnect`` overrunning ``disconnect_timeout`` explains); (2) fencing
tokens that did not grow from one instance of a config to the next; (3) coverage gaps
longer than the settings allow, recovery times per fault kind, leader failovers; (4) a
dirty shutdown (non-zero exits, instances left running, claims or members left in
Redis).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any, Optional

import attrs

from tools.chaos.ledger import Interval, LedgerView, Record, token_regressions
from tools.chaos.model import KINDS, Bounds

__all__ = ["Report", "check"]


@attrs.define
class Report:
    """What :func:`check` found. ``ok`` is False as soon as one invariant failed."""

    bounds: Optional[Bounds]
    configs: list[Any] = attrs.field(factory=list)
    window: tuple[float, float] = (0.0, 0.0)
    instances: int = 0
    #: (1) two instances of one config alive at once, on two nodes or on one (never
    #: allowed, except as explained in :attr:`overruns`)
    overlaps: list[Record] = attrs.field(factory=list)
    #: (1) overlaps explained by a disconnect that overran disconnect_timeout (reported
    #: by a ``disconnect_timeout`` event): after the timeout, dim let the claim go and
    #: only the fencing token protects, until the overrunning disconnect returns
    overruns: list[Record] = attrs.field(factory=list)
    #: (1) disconnects that ran past disconnect_timeout without a disconnect_timeout event
    unreported_overruns: list[Record] = attrs.field(factory=list)
    #: (1) a process woken from SIGSTOP still ran a config another node had taken
    paused_overlaps: list[Record] = attrs.field(factory=list)
    #: (1) per pause: how long after SIGCONT its stale instances kept running
    wake_lags: list[Record] = attrs.field(factory=list)
    #: (2) a config's fencing token went down
    token_regressions: list[Record] = attrs.field(factory=list)
    missing_tokens: list[Record] = attrs.field(factory=list)
    unmatched: list[Record] = attrs.field(factory=list)
    #: (3) every coverage gap (a config running nowhere) and those over the bound
    gaps: list[Record] = attrs.field(factory=list)
    gaps_over_bound: list[Record] = attrs.field(factory=list)
    #: (3) per fault: recovery measured from the ledgers, and when the harness saw it settle
    faults: list[Record] = attrs.field(factory=list)
    leader_failovers: list[Record] = attrs.field(factory=list)
    #: (3) get_config hangs after which the leader never called get_config again
    config_stuck: list[Record] = attrs.field(factory=list)
    #: (4) the end: exit codes, instances left running, what Redis still held
    exits: list[Record] = attrs.field(factory=list)
    open_at_end: list[Record] = attrs.field(factory=list)
    leftovers: Optional[list[str]] = None
    harness_errors: list[str] = attrs.field(factory=list)

    @property
    def violations(self) -> list[str]:
        """One line per failed invariant (empty when everything held)."""
        out = []
        if self.overlaps:
            same = sum(o["first"]["node"] == o["second"]["node"] for o in self.overlaps)
            out.append(f"{len(self.overlaps)} overlaps of one config ({same} of them on one node)")
        if self.unreported_overruns:
            out.append(
                f"{len(self.unreported_overruns)} disconnects overran disconnect_timeout "
                f"without a disconnect_timeout event"
            )
        bad_pauses = [p for p in self.paused_overlaps if not p["within_bound"]]
        if bad_pauses:
            out.append(f"{len(bad_pauses)} overlaps after SIGCONT beyond the wake bound")
        slow_wakes = [w for w in self.wake_lags if not w["within_bound"]]
        if slow_wakes:
            out.append(f"{len(slow_wakes)} woken processes kept stale instances too long")
        if self.token_regressions:
            out.append(f"{len(self.token_regressions)} fencing token regressions")
        if self.missing_tokens:
            out.append(f"{len(self.missing_tokens)} creates without a lease")
        if self.unmatched:
            out.append(f"{len(self.unmatched)} disconnects without a create")
        if self.gaps_over_bound:
            out.append(f"{len(self.gaps_over_bound)} coverage gaps longer than the bound")
        stuck = [f for f in self.faults if f.get("settled") is None]
        if stuck:
            out.append(f"{len(stuck)} faults after which the cluster never settled")
        slow_leader = [f for f in self.leader_failovers if not f["within_bound"]]
        if slow_leader:
            out.append(f"{len(slow_leader)} leader failovers slower than the bound")
        if self.config_stuck:
            out.append(
                f"{len(self.config_stuck)} get_config hangs after which get_config was "
                f"never called again"
            )
        bad_exits = [e for e in self.exits if e["code"] != 0]
        if bad_exits:
            out.append(f"{len(bad_exits)} node processes exited non-zero on SIGTERM")
        if self.open_at_end:
            out.append(f"{len(self.open_at_end)} instances never disconnected on SIGTERM")
        if self.leftovers:
            out.append(f"Redis still holds {len(self.leftovers)} claims/members/leader")
        if self.leftovers is None and self.exits:
            out.append("Redis was not checked for leftovers at the end")
        out.extend(f"harness: {e}" for e in self.harness_errors)
        return out

    @property
    def ok(self) -> bool:
        return not self.violations

    def recovery_by_kind(self) -> dict[str, dict[str, Any]]:
        """Per fault kind: count, recovery and settle times (median, max), bound."""
        by: dict[str, list[Record]] = defaultdict(list)
        for f in self.faults:
            by[f["kind"]].append(f)
        out: dict[str, dict[str, Any]] = {}
        for kind in list(KINDS) + sorted(set(by) - set(KINDS)):
            faults = by.get(kind)
            if not faults:
                continue
            rec = [f["recovery"] for f in faults]
            settle = [f["settle"] for f in faults if f.get("settle") is not None]
            out[kind] = {
                "count": len(faults),
                "recovery_median": statistics.median(rec),
                "recovery_max": max(rec),
                "settle_median": statistics.median(settle) if settle else None,
                "settle_max": max(settle) if settle else None,
                "bound": self.bounds.coverage(kind) if self.bounds else None,
            }
        return out

    def to_dict(self) -> Record:
        return {
            "ok": self.ok,
            "violations": self.violations,
            "bounds": self.bounds.to_dict() if self.bounds else None,
            "configs": len(self.configs),
            "window": list(self.window),
            "instances": self.instances,
            "recovery_by_kind": self.recovery_by_kind(),
            "overlaps": self.overlaps,
            "overruns": self.overruns,
            "unreported_overruns": self.unreported_overruns,
            "paused_overlaps": self.paused_overlaps,
            "wake_lags": self.wake_lags,
            "token_regressions": self.token_regressions,
            "missing_tokens": self.missing_tokens,
            "unmatched": self.unmatched,
            "gaps": len(self.gaps),
            "longest_gap": max((g["duration"] for g in self.gaps), default=0.0),
            "gaps_over_bound": self.gaps_over_bound,
            "faults": self.faults,
            "leader_failovers": self.leader_failovers,
            "config_stuck": self.config_stuck,
            "exits": self.exits,
            "open_at_end": self.open_at_end,
            "leftovers": self.leftovers,
            "harness_errors": self.harness_errors,
        }


def _proc_key(record: Mapping[str, Any]) -> Any:
    """Who a harness record is about: the node id if it says, else the pid."""
    return record.get("node") or int(record["pid"])


def _lookup(table: Mapping[Any, Any], iv: Interval) -> Any:
    return table.get(iv.node, table.get(iv.pid))


def _segments(
    iv: Interval,
    closed_at: Mapping[Any, float],
    pauses: Mapping[Any, list[tuple[float, float]]],
    horizon: float,
) -> tuple[list[tuple[float, float]], Optional[tuple[float, float, float]]]:
    """The stretches in which an instance could act: ``(normal, stale)``.

    ``normal`` are the stretches while its process ran; ``stale``, if any, is
    ``(resumed, end, stopped)`` for an instance that lived across a SIGSTOP: after its
    process woke it ran a config that another node may have taken meanwhile.
    """
    end = iv.end
    if end is None:
        killed = _lookup(closed_at, iv)
        end = horizon if killed is None else killed
    start = iv.start
    for stopped, resumed in sorted(_lookup(pauses, iv) or []):
        if start < stopped < end:
            stale = (resumed, end, stopped) if end > resumed else None
            return [(start, stopped)], stale
    return ([(start, end)] if end > start else []), None


def check(records: Iterable[Mapping[str, Any]], bounds: Optional[Bounds] = None) -> Report:
    """Check the invariants over the records of every ledger of one run (pure).

    Records of the node ledgers are described in :mod:`tools.chaos.ledger`; the harness adds:

    * ``{"ev": "run", "configs": [ids], "settings": {...}, "slack": s}``
    * ``{"ev": "window", "t_start": ..., "t_end": ...}``: the stretch in which every
      config must run (from the first settle to the final SIGTERM);
    * ``{"ev": "killed", "pid": p, "t": ...}``: kill -9, reaped at ``t``;
    * ``{"ev": "paused", "pid": p, "t_stop": ..., "t_cont": ...}``;
    * ``{"ev": "fault", "kind": k, "t_start": ..., "t_end": ..., "settled": t or None,
      "detail": {...}}``; ``detail["blackout"]`` (``[[t0, t1], ...]``) names the
      stretches in which Redis could not be reached, when only part of the fault was;
      ``detail["cleared"]`` of a ``get_config_hang`` is when the hang was lifted;
    * ``{"ev": "exit", "pid": p, "code": c, "node": n, "t_exit": t}`` for a SIGTERM
      (an instance still open then, its disconnect abandoned, ends at ``t_exit``);
      ``{"ev": "final"}`` once every node was asked to stop;
      ``{"ev": "leftovers", "items": [...]}``;
    * ``{"ev": "harness_error", "error": "..."}``.

    An overlap is two intervals of one config that intersect, whether on two nodes or
    on one. It is *explained* (:attr:`Report.overruns`, not a violation) only when the
    earlier instance's ``disconnect`` overran ``disconnect_timeout`` and dim said so
    (a ``disconnect_timeout`` event for that node, config and token), and the later
    instance started no earlier than ``disconnect_timeout`` after that disconnect was
    called (its ``disconnecting`` line): from then until the disconnect returns only
    the fencing token protects.

    ``bounds`` defaults to those of the ``run`` record's settings.
    """
    recs = list(records)
    run: Optional[Mapping[str, Any]] = None
    window: Optional[tuple[float, float]] = None
    closed_at: dict[Any, float] = {}  # process key (node id, else pid) -> gone
    killed_at: dict[Any, float] = {}  # the same, for kill -9 only
    pauses: dict[Any, list[tuple[float, float]]] = defaultdict(list)
    fault_recs: list[Mapping[str, Any]] = []
    exits: list[Record] = []
    leftover_items: Optional[list[str]] = None
    final = False
    harness_errors: list[str] = []
    node_recs: list[Mapping[str, Any]] = []
    for r in recs:
        ev = r.get("ev")
        if ev == "run":
            run = r
        elif ev == "window":
            window = (float(r["t_start"]), float(r["t_end"]))
        elif ev == "killed":
            closed_at[_proc_key(r)] = float(r["t"])
            killed_at[_proc_key(r)] = float(r["t"])
        elif ev == "paused":
            pauses[_proc_key(r)].append((float(r["t_stop"]), float(r["t_cont"])))
        elif ev == "fault":
            fault_recs.append(r)
        elif ev == "exit":
            exits.append({"pid": r["pid"], "code": r["code"], "phase": r.get("phase")})
            if r.get("t_exit") is not None:
                closed_at.setdefault(_proc_key(r), float(r["t_exit"]))
        elif ev == "final":
            final = True
        elif ev == "leftovers":
            leftover_items = [str(i) for i in r.get("items", [])]
        elif ev == "harness_error":
            harness_errors.append(str(r.get("error")))
        else:
            node_recs.append(r)
    if bounds is None and run is not None and "settings" in run:
        bounds = Bounds.from_record(run)
    view = LedgerView(node_recs)
    times = [float(r["t"]) for r in node_recs if "t" in r]
    if window is None:
        window = (min(times, default=0.0), max(times, default=0.0))
    horizon = max([window[1], *times, *closed_at.values()], default=0.0)
    if run is not None and "configs" in run:
        configs = list(run["configs"])
    else:
        configs = sorted({iv.cid for iv in view.intervals}, key=str)
    report = Report(bounds=bounds, configs=configs, window=window)
    report.instances = len(view.intervals)
    report.unmatched = [dict(r) for r in view.unmatched]
    report.missing_tokens = [dict(r) for r in view.missing_token]
    report.exits = exits
    report.leftovers = leftover_items
    report.harness_errors = harness_errors
    report.token_regressions = [
        {"config": a.cid, "before": a.to_dict(), "after": b.to_dict()}
        for a, b in token_regressions(view.intervals)
    ]
    wake_bound = (bounds.wake + bounds.slack) if bounds else float("inf")

    # (1) overlaps, with the stretch after a SIGCONT measured apart
    normal: dict[Any, list[tuple[float, float, Interval]]] = defaultdict(list)
    stale: dict[Any, list[tuple[float, float, Interval, float]]] = defaultdict(list)
    lags: dict[tuple[int, float], list[float]] = defaultdict(list)
    for iv in view.intervals:
        segs, st = _segments(iv, closed_at, pauses, horizon)
        for s, e in segs:
            normal[iv.cid].append((s, e, iv))
        if st is not None:
            resumed, end, stopped = st
            stale[iv.cid].append((resumed, end, iv, stopped))
            lags[(iv.pid, resumed)].append(max(0.0, end - resumed))
    # a disconnect that overran disconnect_timeout, as dim reported it
    reported: dict[tuple[Any, Any, Any], float] = {}
    for r in view.events:
        if r.get("type") == "disconnect_timeout":
            reported.setdefault((r.get("node"), r.get("id"), r.get("token")), float(r["t"]))
    overrun_after = bounds.disconnect_timeout if bounds else None
    tolerance = bounds.overrun_tolerance if bounds else 0.0

    def explained(a: Interval, b: Interval, start: float) -> Optional[Record]:
        """Why an overlap from ``start`` is allowed: an overrunning disconnect of one."""
        for x in (a, b):
            called = view.disconnecting.get((x.node, x.inst))
            event = reported.get((x.node, x.cid, x.token))
            if called is None or event is None or x.start > start:
                continue
            if overrun_after is not None and start < called + overrun_after - tolerance:
                continue
            return {"overrunning": x.to_dict(), "disconnect_called": called, "reported": event}
        return None

    def overlap(a: Interval, b: Interval, start: float, end: float) -> None:
        entry: Record = {
            "config": a.cid,
            "first": a.to_dict(),
            "second": b.to_dict(),
            "start": start,
            "duration": end - start,
            "same_node": a.node == b.node,
        }
        why = explained(a, b, start)
        if why is None:
            report.overlaps.append(entry)
        else:
            entry.update(why)
            report.overruns.append(entry)

    for entries in normal.values():
        entries.sort(key=lambda e: e[0])
        for i, (_a_start, a_end, a) in enumerate(entries):
            for b_start, b_end, b in entries[i + 1 :]:
                if b_start >= a_end:
                    break
                overlap(a, b, b_start, min(a_end, b_end))
    for cid, stales in stale.items():
        for resumed, end, iv, _stopped in stales:
            for s, e, other in normal.get(cid, []):
                lo, hi = max(s, resumed), min(e, end)
                if hi <= lo:
                    continue
                if other.pid == iv.pid and other.node == iv.node:
                    # the woken process started the config again before its stale
                    # instance was down: an overlap on one node, never allowed
                    overlap(iv, other, lo, hi)
                    continue
                lag = end - resumed
                report.paused_overlaps.append(
                    {
                        "config": cid,
                        "paused": iv.to_dict(),
                        "other": other.to_dict(),
                        "duration": hi - lo,
                        "lag": lag,
                        "within_bound": lag <= wake_bound,
                    }
                )
    # every disconnect that ran past disconnect_timeout must have been reported
    if overrun_after is not None and bounds is not None:
        for iv in view.intervals:
            called = view.disconnecting.get((iv.node, iv.inst))
            if called is None or _lookup(killed_at, iv) is not None:
                continue
            end = iv.end if iv.end is not None else _lookup(closed_at, iv)
            if end is None or end - called <= overrun_after + 2 * bounds.heartbeat_interval:
                continue
            frozen = _lookup(pauses, iv) or []
            if any(stop < end and cont > called for stop, cont in frozen):
                continue
            if (iv.node, iv.cid, iv.token) not in reported:
                report.unreported_overruns.append(
                    {
                        "instance": iv.to_dict(),
                        "disconnect_called": called,
                        "returned": iv.end,
                        "took": end - called,
                    }
                )
    for (pid, resumed), values in sorted(lags.items(), key=lambda kv: kv[0][1]):
        lag = max(values)
        report.wake_lags.append(
            {
                "pid": pid,
                "resumed": resumed,
                "lag": lag,
                "instances": len(values),
                "within_bound": lag <= wake_bound,
            }
        )

    # (3) coverage gaps within the window
    blackouts: list[tuple[float, float]] = []
    for fr in fault_recs:
        named = (fr.get("detail") or {}).get("blackout")
        if named is not None:
            blackouts += [(float(b0), float(b1)) for b0, b1 in named]
        elif fr.get("kind") in KINDS and KINDS[str(fr["kind"])].blackout:
            blackouts.append((float(fr["t_start"]), float(fr["t_end"])))
    ordered_faults = sorted(fault_recs, key=lambda f: float(f["t_start"]))
    starts = [float(f["t_start"]) for f in ordered_faults]
    w0, w1 = window

    def fault_at(t: float) -> Optional[Mapping[str, Any]]:
        found = None
        for f in ordered_faults:
            if float(f["t_start"]) <= t:
                found = f
            else:
                break
        return found

    for cid in configs:
        segs = sorted((s, e) for s, e, _ in normal.get(cid, []))
        cursor = w0
        holes: list[tuple[float, float]] = []
        for s, e in segs:
            if e <= cursor:
                continue
            if s > cursor:
                holes.append((cursor, min(s, w1)))
            cursor = max(cursor, e)
            if cursor >= w1:
                break
        if cursor < w1:
            holes.append((cursor, w1))
        for g0, g1 in holes:
            if g1 <= g0:
                continue
            excused = sum(max(0.0, min(g1, b1) - max(g0, b0)) for b0, b1 in blackouts)
            f = fault_at(g0)
            kind = str(f["kind"]) if f is not None else None
            gap: Record = {
                "config": cid,
                "start": g0,
                "end": g1,
                "duration": g1 - g0,
                "excused": excused,
                "kind": kind,
                "open_at_end": g1 >= w1 and cursor < w1,
            }
            report.gaps.append(gap)
            if bounds is not None:
                allowed = bounds.coverage(kind) + bounds.slack
                gap["bound"] = bounds.coverage(kind)
                if g1 - g0 - excused > allowed:
                    report.gaps_over_bound.append(gap)

    # (3) recovery per fault, from the gaps that ended in its stretch
    for i, f in enumerate(ordered_faults):
        kind = str(f["kind"])
        t_start = float(f["t_start"])
        t_end = float(f.get("t_end", t_start))
        until = starts[i + 1] if i + 1 < len(starts) else w1
        meta = KINDS.get(kind)
        ref = t_end if meta is not None and meta.measure_from == "end" else t_start
        # the longest any config stayed down, counted from the fault (or from when its
        # condition cleared): gaps from later moves (a node rejoining) count from their
        # own start
        mine = [g for g in report.gaps if t_start < g["end"] <= until]
        recovery = max((g["end"] - max(g["start"], ref) for g in mine), default=0.0)
        recovery = max(0.0, recovery)
        settled = f.get("settled")
        entry: Record = {
            "kind": kind,
            "t_start": t_start,
            "t_end": t_end,
            "duration": t_end - t_start,
            "recovery": recovery,
            "gaps": len(mine),
            "settled": settled,
            "settle": (float(settled) - ref) if settled is not None else None,
            "detail": f.get("detail", {}),
        }
        report.faults.append(entry)
        if kind == "kill_leader":
            victim = f.get("detail", {}).get("pid")
            gained = [
                float(r["t"])
                for r in view.events
                if r.get("type") == "leadership_gained"
                and r.get("pid") != victim
                and float(r["t"]) > t_start
            ]
            if gained:
                took = min(gained) - t_start
                bound = (bounds.leader + bounds.slack) if bounds else float("inf")
                report.leader_failovers.append(
                    {"t_start": t_start, "took": took, "within_bound": took <= bound}
                )

    # (3) after a get_config hang was lifted, the leader called get_config again
    for f in ordered_faults:
        cleared = (f.get("detail") or {}).get("cleared")
        if f.get("kind") != "get_config_hang" or cleared is None:
            continue
        later = [float(r["t"]) for r in view.get_config_calls if float(r["t"]) > cleared]
        if not later:
            report.config_stuck.append(
                {"t_start": float(f["t_start"]), "cleared": cleared, "detail": f.get("detail")}
            )

    # (4) the end: every instance of a process that was not killed was disconnected (or
    # its disconnect overran disconnect_timeout, was reported, and was abandoned when
    # the process exited)
    if final:
        report.open_at_end = [
            iv.to_dict()
            for iv in view.intervals
            if iv.end is None
            and _lookup(killed_at, iv) is None
            and (iv.node, iv.cid, iv.token) not in reported
        ]
    return report
