"""The protocol's codes and field formats, in one place (docs/protocol.rst, section 2).

Every value a script returns as a code is an :class:`enum.IntEnum` here, and every
field or value whose text carries structure (``"drain <node>"``, ``"<node>:<token>"``)
is built and parsed only here. The scripts themselves are in ``dim/lua/``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Optional

import attrs

from dim.era import Header


class ClaimStatus(enum.IntEnum):
    """What the heartbeat script says of each claim it renews."""

    LOST = 0  # held by another node: stop the instance at once
    RENEWED = 1
    TAKEN_BACK = 2  # it was missing (Redis lost it) and this node took it back
    RELEASED = 3  # missing while the membership was intact: released, not lost


class ClaimRefused(enum.IntEnum):
    """The claim script's answer when it gives no token (a token is positive)."""

    HELD = 0  # another node holds it, or this node left
    NOT_NOW = -1  # a reset window is open, or the request came too late


class WriteRefused(enum.IntEnum):
    """The leader-write script's answer when it wrote nothing (a version is positive)."""

    DEPOSED = -1  # the leader key no longer holds this leader's value
    RESET = -2  # a reset window opened that the plan does not know of
    LATE = -3  # the request arrived too late


# -- replies --------------------------------------------------------------------------


@attrs.frozen
class Beat:
    """What one heartbeat learned."""

    header: Header
    outcome: str  # 'ok', 'gone' (this node left: nothing renewed), 'taken' (another
    # live process owns this node id: nothing changed)
    version: Optional[str]
    leader: Optional[str]
    acquired: bool
    claims: dict[str, ClaimStatus]
    view: Optional[View] = None  # the membership, when asked for (the leader)

    @property
    def stale(self) -> bool:
        """The request arrived too late and did nothing."""
        return self.header.status == "stale"

    @property
    def gone(self) -> bool:
        return self.outcome == "gone"

    @property
    def taken(self) -> bool:
        return self.outcome == "taken"

    @property
    def now_ms(self) -> int:
        return self.header.now_ms


@attrs.frozen
class View:
    """The leader's view of the membership, read in one round trip."""

    now_ms: int  # server time of the read
    members: dict[str, int]  # node id -> expiry ms, live or expired
    failures: dict[str, int]  # '<node> <ckey>' -> until ms
    # live node -> its description's weight, static, tags and capacity fields, if read
    infos: Optional[dict[str, dict[str, Optional[str]]]] = None
    control: dict[str, str] = attrs.field(factory=dict)  # the operator's controls

    @property
    def paused(self) -> bool:
        return paused(self.control)

    @property
    def draining(self) -> set[str]:
        return draining(self.control)

    @property
    def absent_since(self) -> dict[str, int]:
        """Static nodes whose rejoin grace runs: node -> server ms a leader first saw it
        gone (the control hash)."""
        return absent_since(self.control)

    @property
    def static_names(self) -> set[str]:
        """Nodes known to use a static name (live or not), from the control hash."""
        return static_names(self.control)

    def live(self) -> list[str]:
        return sorted(n for n, expiry in self.members.items() if expiry > self.now_ms)

    def dead(self) -> list[str]:
        return sorted(n for n, expiry in self.members.items() if expiry <= self.now_ms)


@attrs.frozen
class ConfigPlace:
    """Where the leader put a config (None: unassigned) and its stored JSON (None: gone)."""

    node: Optional[str]
    config_json: Optional[str]
    waiting: bool = False  # the leader found no node that may take it (tags, capacity)
    # this node's desired set names it but the assignment says otherwise (a lost write):
    # neither start nor stop it until the leader has repaired the disagreement
    contested: bool = False


@attrs.frozen
class ShareRead:
    """What ``READ_DESIRED`` returned: the share version, then either the whole share
    (``removed`` None) or the delta since the version the node held (``entries`` added
    or changed, ``removed`` taken out), and where the configs asked about belong."""

    version: Optional[str]
    entries: dict[str, Optional[str]]  # ckey -> config json (None: the config is gone)
    placements: dict[str, ConfigPlace]
    removed: Optional[tuple[str, ...]] = None
    # the fence counter when the read ran: a write of a later version came after it
    fence: int = 0


# -- the control hash (operator controls and what leaders keep for static nodes) ------

PAUSED = "paused"


def drain_field(node: str) -> str:
    return f"drain {node}"


def static_field(node: str) -> str:
    return f"static {node}"


def absent_field(node: str) -> str:
    return f"absent {node}"


def _named(control: Mapping[str, str], kind: str) -> dict[str, str]:
    prefix = kind + " "
    return {f[len(prefix) :]: v for f, v in control.items() if f.startswith(prefix)}


def paused(control: Mapping[str, str]) -> bool:
    """Is rebalancing paused?"""
    return control.get(PAUSED) == "1"


def draining(control: Mapping[str, str]) -> set[str]:
    """The nodes an operator drains."""
    return set(_named(control, "drain"))


def static_names(control: Mapping[str, str]) -> set[str]:
    """Nodes known to use a static name (live or not)."""
    return set(_named(control, "static"))


def absent_since(control: Mapping[str, str]) -> dict[str, int]:
    """Static nodes whose rejoin grace runs -> server ms a leader first saw them gone."""
    return {n: int(v) for n, v in _named(control, "absent").items() if v.isdigit()}


# -- other structured values -----------------------------------------------------------


def failure_field(node: str, ckey: str) -> str:
    """A field of the failures hash: this node gave this config up."""
    return f"{node} {ckey}"


def split_failure(field: str) -> tuple[str, str]:
    node, _, ckey = field.partition(" ")
    return node, ckey


def owner(node: str, number: int) -> str:
    """A claim value (``number`` is the token) or the leader value (the epoch)."""
    return f"{node}:{number}"


def parse_owner(value: Optional[str]) -> Optional[tuple[str, int]]:
    """Split ``'<node>:<number>'`` (a claim or leader value); None if malformed."""
    if not value:
        return None
    node, sep, number = value.rpartition(":")
    if not sep or not node or not number.isdigit():
        return None
    return node, int(number)


def parse_health(value: Optional[str]) -> tuple[int, int]:
    """A node's ``'<running> <unhealthy>'`` health field; (0, 0) if missing or malformed."""
    parts = (value or "").split()
    # isascii: str.isdigit() takes digits that int() refuses ("²")
    if len(parts) == 2 and all(p.isascii() and p.isdigit() for p in parts):
        return int(parts[0]), int(parts[1])
    return 0, 0


def tombstone(node: str, session: str) -> str:
    """A member of the left zset: this process of that node has left."""
    return f"{node} {session}"
