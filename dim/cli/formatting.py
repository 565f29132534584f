"""The text the ``dim`` command prints: the status table, moves and the config table.

Pure functions of the typed values :mod:`dim.admin` returns; no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from dim.admin import ConfigListing, Move
from dim.status import ClusterStatus, age

MAX_LISTED = 12  # config ids listed in one line of the table footer


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    if len(items) > MAX_LISTED:
        shown += f", ... ({len(items) - MAX_LISTED} more)"
    return shown


def _columns(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def format_status(status: ClusterStatus, labels: Optional[Mapping[int, str]] = None) -> str:
    """A fixed-width table of the cluster; ``labels`` names nodes by pid (the demo's n1...)."""
    leader = status.leader or "none"
    if status.leader is not None and status.epoch is not None:
        leader += f" (epoch {status.epoch})"
    version = "none" if status.version is None else str(status.version)
    lines = [f"service {status.service}   leader {leader}   assignment version {version}"]
    if status.paused:
        lines.append("REBALANCING PAUSED (dim resume ends it)")
    if not status.nodes:
        lines.append("no live nodes")
    else:
        header = ["", "NODE", "HOST", "PID", "WEIGHT", "AGE", "EXPIRES IN", "ASSIGNED", "RUNNING"]
        constrained = any(n.tags or n.capacity is not None for n in status.nodes)
        if constrained:
            header.append("TAGS")
        if labels is not None:
            header.insert(1, "NAME")
        rows = [header]
        for node in status.nodes:
            row = [
                "*" if node.node_id == status.leader else "",
                node.node_id,
                node.host or "?",
                "?" if node.pid is None else str(node.pid),
                f"{node.weight:g}",
                _duration(age(node.started)),
                _duration(node.expires_in),
                str(node.assigned),
                str(node.running)
                + (f" ({node.unhealthy} unhealthy)" if node.unhealthy else "")
                + (" (draining)" if node.draining else ""),
            ]
            if constrained:
                limit = "" if node.capacity is None else f" max {node.capacity}"
                row.append((",".join(node.tags) or "-") + limit)
            if labels is not None:
                row.insert(1, labels.get(node.pid, "?") if node.pid is not None else "?")
            rows.append(row)
        lines += _columns(rows)
        lines.append("(* = leader)")
    configs = status.configs
    not_running = status.not_running
    pending = status.pending
    lines.append(
        f"configs: {len(configs)} published, {len(configs) - len(not_running)} running, "
        f"{len(not_running)} not running anywhere, {len(pending)} pending handoffs"
    )
    if not_running:
        lines.append("not running anywhere: " + _listing([str(c) for c in not_running]))
    unplaceable = status.unplaceable
    if unplaceable:
        lines.append(
            "cannot be placed: " + _listing([f"{c} ({why})" for c, why in unplaceable.items()])
        )
    if pending:
        moves = []
        for config_id in pending:
            config = configs[config_id]
            moves.append(
                f"{config_id} (assigned to {config.assigned_to or 'nobody'}, "
                f"held by {config.claimed_by or 'nobody'})"
            )
        lines.append("pending handoffs: " + _listing(moves))
    return "\n".join(lines)


def format_move(move: Move) -> str:
    """One line for a config whose holder changed."""
    if move.source is None:
        return f"config {move.config_id}: started on {move.target}"
    if move.target is None:
        return f"config {move.config_id}: stopped on {move.source}"
    return f"config {move.config_id}: moved {move.source} -> {move.target}"


def config_rows(listing: ConfigListing) -> list[dict[str, Any]]:
    """The JSON of ``dim config --json``: one object per config."""
    return [
        {
            "id": c.config_id,
            "assigned_to": c.assigned_to,
            "claimed_by": c.claimed_by,
            "config": c.config,
        }
        for c in listing.configs
    ]


def format_configs(service: str, listing: ConfigListing) -> str:
    """The table of ``dim config``: a heading line, then one row per config."""
    version = listing.version if listing.version is not None else "none"
    lines = [
        f"service {service}: {len(listing.configs)} configs (as published by the leader, "
        f"assignment version {version})"
    ]
    if listing.configs:
        table = [["ID", "ASSIGNED TO", "HELD BY", "CONFIG"]]
        for config in listing.configs:
            content = json.dumps(config.config, default=str, sort_keys=True)
            if len(content) > 60:
                content = content[:57] + "..."
            table.append(
                [
                    str(config.config_id),
                    config.assigned_to or "-",
                    config.claimed_by or "-",
                    content,
                ]
            )
        lines += _columns(table)
    return "\n".join(lines)
