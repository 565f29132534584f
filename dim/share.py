"""A node's copy of its share: pure steps from a read or a hint's delta to the configs
it should run and where the others it handles went (protocol.rst §4.1).

No I/O and no locks: :class:`dim.reconciler.Reconciler` calls these under its table's
lock and keeps the versions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Optional

import attrs

from dim.configs import Config, decode
from dim.protocol import ConfigPlace, ShareRead
from dim.slots import Slot

Delta = tuple[Mapping[str, str], Mapping[str, Optional[str]]]
"""A hint's inline delta: the configs added or changed (key -> JSON), and where each
removed config went (key -> node, or None: gone)."""


@attrs.frozen
class Hint:
    """An ``assigned`` hint kept until the read under way comes back."""

    version: str
    previous: Optional[int]
    delta: Optional[Delta]
    held: tuple[str, ...] = ()  # configs the delta adds that another node still held


def newer(a: str, b: str) -> bool:
    """Share version ``a`` is later than ``b`` (versions are fence values)."""
    try:
        return int(a) > int(b)
    except ValueError:
        return False


def follows(previous: int, version: str, held: Optional[str], read_fence: int, empty: bool) -> bool:
    """The delta of write ``version`` from share version ``previous`` applies to a node
    that holds share version ``held`` (None: none read; its last read ran at fence
    ``read_fence``), and, with ``empty``, wants and handles nothing."""
    if held == str(previous):
        return True  # share versions are unique: exactly that share
    # no share before the write ("p": 0), none read, nothing handled, and the write
    # came after that read (an older "p": 0 hint may be a predecessor's, under the
    # same static name): a joining node whose first read beat the leader's answer
    return previous == 0 and held is None and empty and newer(version, str(read_fence))


def after_read(
    desired: Mapping[str, Config],
    placements: Mapping[str, ConfigPlace],
    slots: Mapping[str, Slot],
    share: ShareRead,
) -> tuple[dict[str, Config], dict[str, ConfigPlace]]:
    """The share and placements after a read: the whole share, or the delta since the
    version held applied to ``desired``."""
    if share.removed is None:
        out = {}
        places = dict(share.placements)
    else:  # the delta since the version we hold
        gone = set(share.removed)
        out = {c: v for c, v in desired.items() if c not in gone}
        places = {c: p for c, p in {**placements, **share.placements}.items() if c in slots}
    _put(out, share.entries)
    return out, places


def after_delta(
    desired: Mapping[str, Config],
    placements: Mapping[str, ConfigPlace],
    slots: Mapping[str, Slot],
    delta: Delta,
) -> tuple[dict[str, Config], dict[str, ConfigPlace]]:
    """The share and placements after a delta the leader sent inline."""
    added, moved = delta
    out = {c: v for c, v in desired.items() if c not in moved}
    _put(out, added)
    places = {c: p for c, p in placements.items() if c in slots}
    for ckey, to in moved.items():
        if ckey in slots:
            # moved on (a node) or gone (None): either way it stops here
            places[ckey] = ConfigPlace(to, slots[ckey].config.json if to else None)
    return out, places


def _put(share: dict[str, Config], entries: Mapping[str, Optional[str]]) -> None:
    """Add or change these configs in ``share``; one gone (None) or that does not parse
    (logged) leaves it, as a read and a delta alike."""
    for ckey, text in entries.items():
        config = decode(ckey, text)
        if config is not None:
            share[ckey] = config
        else:
            share.pop(ckey, None)


def keep(
    read_version: Optional[str], placement: Optional[ConfigPlace], resetting: Callable[[], bool]
) -> bool:
    """Keep running a config that is not in the node's desired set?

    Only while nobody else is meant to run it and it still exists: after Redis lost or
    rewound its data (no version yet, or a reset window) or while a new leader rebuilds
    the placement from the claims, a config is briefly unassigned or assigned by stale
    data, and stopping it then would move it for nothing. A config assigned elsewhere,
    or removed, stops.

    :param read_version: the share version the node holds (None: none read yet).
    :param placement: where the config stands, from the node's last read or hint.
    :param resetting: whether Redis is in a reset window (:meth:`dim.era.Era.resetting`).
    """
    if read_version is None:
        return True
    if placement is None:
        return False
    if resetting() or placement.contested:
        return placement.config_json is not None
    return placement.node is None and placement.config_json is not None and not placement.waiting
