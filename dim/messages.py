"""Pub/sub hints: schema, encoding and validation.

Messages are hints, never the truth: they only wake a loop sooner than its next tick,
and the loop then reads the keys. A lost message costs at most one heartbeat interval.
So a message is tiny, has a fixed schema, and anything that does not fit (too big, not
JSON, unknown kind, wrong types) is rejected with :class:`~dim.errors.MessageError` and
dropped by the listener.

Wire format: a JSON object ``{"k": kind, "n": node id, "v": version, "p": previous
version, "e": epoch, "c": [config keys], "t": [node ids]}``; all but ``k`` and ``n`` are
optional. Hints that concern one node go to its inbox (``assigned`` to each node whose
share changed, ``released`` to the node a freed claim's config is assigned to,
``joined`` and ``left`` to the leader: protocol.rst §11); ``t`` is read from older
leaders that named the targets on the shared channel. A ``released`` hint names the
claims it freed when they fit in one message; without ``c`` the node retries every
claim it waits for.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from enum import Enum
from typing import Optional, Union

import attrs

from dim.errors import MessageError

MAX_MESSAGE_BYTES = 1024


class Kind(str, Enum):
    """What a hint announces."""

    JOINED = "joined"  # a node joined: the leader rebalances
    LEFT = "left"  # a node left gracefully: the leader rebalances, waiting nodes retry claims
    ASSIGNED = "assigned"  # the leader wrote a new assignment version
    RELEASED = "released"  # a claim was released: nodes waiting for it retry at once
    FAILED = "failed"  # a node gave up a config after repeated create failures
    LEADER_LEFT = "leader_left"  # the leader stepped down: nodes try to take over now
    REFRESH = "refresh"  # someone asked the leader to call get_config now
    CONTROL = "control"  # an operator paused, resumed, drained or asked for a rebalance


@attrs.frozen
class Message:
    """One hint."""

    kind: Kind
    node: str
    version: Optional[int] = None
    epoch: Optional[int] = None
    # the claims a ``released`` or ``failed`` hint names; in an ``assigned`` hint's
    # delta, the configs it adds that another node's claim held at the write
    ckeys: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    previous: Optional[int] = None  # the version an ``assigned`` hint follows
    # an ``assigned`` hint's delta of the node's share, when it fits (protocol.rst §4.1):
    # config key -> JSON of each config added or changed, and config key -> the node
    # each removed config went to (None: it is gone); None when the hint carries none
    added: Optional[Mapping[str, str]] = None
    moved: Optional[Mapping[str, Optional[str]]] = None

    @classmethod
    def released(cls, node: str, ckeys: Iterable[str]) -> Message:
        """A ``released`` hint naming these claims, or none if they do not all fit."""
        return cls(Kind.RELEASED, node, ckeys=_fitting(ckeys))

    @classmethod
    def failed(cls, node: str, ckeys: Iterable[str]) -> Message:
        """A ``failed`` hint naming these configs, or none if they do not fit."""
        return cls(Kind.FAILED, node, ckeys=_fitting(ckeys))

    def encode(self) -> bytes:
        body: dict[str, Union[str, int, list[str]]] = {"k": self.kind.value, "n": self.node}
        if self.version is not None:
            body["v"] = self.version
        if self.previous is not None:
            body["p"] = self.previous
        if self.epoch is not None:
            body["e"] = self.epoch
        if self.ckeys:
            body["c"] = list(self.ckeys)
        if self.targets:
            body["t"] = list(self.targets)
        data = json.dumps(body, separators=(",", ":")).encode()
        if len(data) > MAX_MESSAGE_BYTES:
            raise MessageError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
        return data


def _fitting(ckeys: Iterable[str]) -> tuple[str, ...]:
    """The names if they all fit in one message, else none (every waiting node retries)."""
    names = tuple(ckeys)
    if len(json.dumps(names)) > MAX_MESSAGE_BYTES - 300:
        return ()
    return names


def _optional_int(body: dict[str, object], field: str) -> Optional[int]:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MessageError(f"message field {field!r} must be a non-negative int, got {value!r}")
    return value


def _strings(body: dict[str, object], field: str, what: str) -> tuple[str, ...]:
    value = body.get(field, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise MessageError(f"message {what} must be a list of strings, got {value!r}")
    return tuple(value)


def decode(data: object) -> Message:
    """Parse and validate one message payload; raise MessageError if it does not fit."""
    if isinstance(data, str):
        data = data.encode()
    if not isinstance(data, bytes):
        raise MessageError(f"message payload must be bytes, got {type(data).__name__}")
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        body = json.loads(data)
    except ValueError as exc:
        raise MessageError(f"message is not JSON: {data[:80]!r}") from exc
    if not isinstance(body, dict):
        raise MessageError(f"message must be a JSON object, got {data[:80]!r}")
    unknown = set(body) - {"k", "n", "v", "p", "e", "c", "t", "a", "r"}
    if unknown:
        raise MessageError(f"message has unknown fields {sorted(unknown)!r}")
    try:
        kind = Kind(body.get("k"))
    except ValueError:
        raise MessageError(f"message kind {body.get('k')!r} is unknown") from None
    node = body.get("n")
    if not isinstance(node, str) or not node or len(node) > 200:
        raise MessageError(f"message node must be a non-empty string, got {node!r}")
    ckeys = _strings(body, "c", "config keys")
    targets = _strings(body, "t", "target nodes")
    added = body.get("a")
    if added is not None and not (
        isinstance(added, dict) and all(isinstance(v, str) for v in added.values())
    ):
        raise MessageError(f"message field 'a' must map config keys to JSON, got {added!r}")
    moved = body.get("r")
    if moved is not None and not (
        isinstance(moved, dict) and all(v is None or isinstance(v, str) for v in moved.values())
    ):
        raise MessageError(f"message field 'r' must map config keys to nodes, got {moved!r}")
    if (added is None) != (moved is None):
        raise MessageError("message fields 'a' and 'r' come together")
    return Message(
        kind=kind,
        node=node,
        version=_optional_int(body, "v"),
        previous=_optional_int(body, "p"),
        epoch=_optional_int(body, "e"),
        ckeys=ckeys,
        targets=targets,
        added=added,
        moved=moved,
    )
