"""The leader's writes to Redis: one change set, cut into parts when it is large.

A Lua script holds the whole shard while it runs: every heartbeat, claim renewal and
read of every node waits behind it, and past Redis's ``busy-reply-threshold`` (5 s by
default) they fail with ``BUSY``. The first placement of a million configs is about three
million entries, several seconds of script. So a change larger than :data:`PART`
entries (or :data:`PART_BYTES` of config JSON) goes in parts
(:func:`dim.change.split`), each its own leader-write script, each fenced by the leader
check, each leaving Redis consistent (protocol.rst §4.2).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Callable, Optional

import attrs

from dim import change as change_set
from dim.change import Change
from dim.protocol import parse_owner

if TYPE_CHECKING:
    from dim.store import Store

PART = 20_000
"""The most entries one leader-write script applies: about 50 ms of Redis time."""

PART_BYTES = 8 << 20
"""The most config JSON one leader-write script carries (8 MiB)."""


@attrs.frozen
class Wrote:
    """What a write did.

    :ivar version: the last version written, or the refusal (a
        :class:`~dim.protocol.WriteRefused` code) of the part that was refused.
    :ivar kept: nodes the change dropped that were alive again (kept in the members).
    :ivar applied: the parts that went through, in order (all of them, or those before
        a refusal or an error).
    :ivar parts: how many parts the change was cut into.
    :ivar written: the version the last part that went through wrote (0: none).
    :ivar error: the error that stopped the write (a Redis error: the part whose reply
        is lost may have gone through; it is not in ``applied``).
    """

    version: int
    kept: tuple[str, ...]
    applied: tuple[Change, ...]
    parts: int
    written: int = 0
    error: Optional[Exception] = None

    @property
    def partial(self) -> bool:
        """Some parts went through and not all: Redis holds part of the change."""
        return 0 < len(self.applied) < self.parts


def write(
    store: Store,
    leader_value: str,
    change: Change,
    assignment: Mapping[str, str],
    targets: Collection[str],
    configs: Optional[Mapping[str, str]] = None,
    limit: int = 0,
    reset_id: str = "",
    progress: Optional[Callable[[], None]] = None,
) -> Wrote:
    """Write ``change`` as leader ``leader_value`` (``'<node>:<epoch>'``). ``assignment``
    is the placement after it, ``targets`` the nodes to tell (each part tells those
    whose share it changes, the last part the rest). ``configs`` and ``limit``: see
    :func:`dim.change.deltas`. ``progress`` is called before each part, the split
    done (a long write is not a stuck leader).

    Stops at the first part refused or failed, and says how far it got."""
    owner = parse_owner(leader_value)
    if owner is None:
        raise ValueError(f"not a leader value: {leader_value!r}")
    node_id, epoch = owner
    parts = change_set.split(change, PART, PART_BYTES, assignment)
    targets = set(targets)
    untold = set(targets)
    written = 0
    kept: tuple[str, ...] = ()
    for i, part in enumerate(parts):
        if progress is not None:
            progress()
        told = change_set.touched(part, assignment) & targets
        if i == len(parts) - 1:
            told |= untold
        untold -= told
        try:
            version, nodes = store.leader_write(
                leader_value,
                part,
                epoch,
                node_id,
                change_set.deltas(part, assignment, told, configs, limit),
                reset_id=reset_id,
            )
        except Exception as exc:  # a Redis error, or a reply that does not parse
            return Wrote(written, kept, tuple(parts[:i]), len(parts), written, exc)
        if version < 0:
            return Wrote(version, kept, tuple(parts[:i]), len(parts), written)
        written = version
        kept += tuple(nodes)
    return Wrote(written, kept, tuple(parts), len(parts), written)
