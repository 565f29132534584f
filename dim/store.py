"""The one module that talks to Redis: typed methods over the keys and scripts.

Everything read from Redis is treated as foreign data: values that do not parse are
logged and skipped, never trusted. Nothing read is ever unpickled, evaluated or imported.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any, Optional, Union

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from dim import protocol, scripts
from dim.change import Change
from dim.era import Era, Header
from dim.keys import Keys
from dim.messages import Message
from dim.protocol import Beat, ClaimStatus, ConfigPlace, ShareRead, View, parse_owner
from dim.urls import client_from_url

log = logging.getLogger(__name__)


def text(value: Any) -> Optional[str]:
    """Decode a Redis reply to str (None stays None)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class Store:
    """Typed access to one service's keys."""

    def __init__(self, client: Client, service: str, era: Optional[Era] = None) -> None:
        self.client = client
        self.keys = Keys(service)
        # what this node knows of the server: fed by every node script's reply
        self.era = era if era is not None else Era(time.monotonic, None, 1.0)
        register = client.register_script
        self._heartbeat = register(scripts.HEARTBEAT)
        self._leader_read = register(scripts.LEADER_READ)
        self._claim = register(scripts.CLAIM)
        self._release = register(scripts.RELEASE)
        self._retoken = register(scripts.RETOKEN)
        self._settle = register(scripts.SETTLE)
        self._leave = register(scripts.LEAVE)
        self._repair_read = register(scripts.REPAIR_READ)
        self._leader_write = register(scripts.LEADER_WRITE)
        self._read_desired = register(scripts.READ_DESIRED)
        self._resign = register(scripts.RESIGN)
        self._forget = register(scripts.FORGET)
        self._report_failure = register(scripts.REPORT_FAILURE)

    # -- every node -----------------------------------------------------------------

    def ping(self) -> None:
        self.client.ping()

    def _node_script(self, script: Any, keys: list[str], args: list[Any]) -> tuple[Header, Any]:
        """Run a node script (its first keys and argument are the check's, see
        dim.era); feed the reply's header to the era and return it with the rest."""
        k = self.keys
        era = self.era
        said_jump = era.jumped
        sent = era.clock()
        reply = script(keys=[k.era, k.fence, k.reset, *keys], args=[era.context(), *args])
        header = Header.parse(reply)
        era.observe(header, sent, era.clock(), said_jump)
        return header, reply[5:]

    def heartbeat(
        self,
        node_id: str,
        *,
        node_ttl: float,
        leader_ttl: float,
        leaving: bool,
        may_lead: bool,
        renew_leader: str,
        info: dict[str, str],
        claims: dict[str, tuple[str, float]],
        view: bool = False,
        joined: Optional[Message] = None,
        session: str = "",
        health: str = "",
    ) -> Beat:
        """Renew membership, claims and leadership in one round trip (see scripts.HEARTBEAT).

        ``claims`` maps each claim key to its value ``'<node>:<token>'`` and the TTL to
        renew it with. With ``view`` the reply carries the membership and failures (for
        the leader); ``joined`` is published if this beat (re)adds the node.
        """
        k = self.keys
        ckeys = list(claims)
        pairs: list[Any] = []
        for c in ckeys:
            value, ttl = claims[c]
            pairs += [value, ms(ttl)]
        header, rest = self._node_script(
            self._heartbeat,
            [k.nodes, k.node(node_id), k.leader, k.shares, k.left, k.failures, k.control]
            + [k.claim(c) for c in ckeys],
            [
                node_id,
                ms(node_ttl),
                ms(leader_ttl),
                "leaving" if leaving else "member",
                "1" if may_lead else "0",
                renew_leader,
                "1" if view else "0",
                k.events,
                joined.encode() if joined is not None else "",
                session,
                health,
                json.dumps(info, sort_keys=True),
                *pairs,
            ],
        )
        outcome = text(rest[0]) or "ok"
        statuses = rest[4] or []
        leader = text(rest[2])
        if leader is not None:
            owner = parse_owner(leader)
            if owner is not None:
                self.era.note(owner[1])
        return Beat(
            header=header,
            outcome=outcome,
            version=text(rest[1]),
            leader=leader,
            acquired=bool(rest[3]),
            claims={c: ClaimStatus(int(st)) for c, st in zip(ckeys, statuses)},
            view=(
                View(
                    header.now_ms,
                    self._members(rest[5]),
                    self._failures(rest[6]),
                    control=_pairs(rest[7]),
                )
                if view and outcome == "ok" and header.status == "ok"
                else None
            ),
        )

    def _members(self, flat: Any) -> dict[str, int]:
        out: dict[str, int] = {}
        flat = flat or []
        for i in range(0, len(flat) - 1, 2):
            try:
                out[str(text(flat[i]))] = int(float(text(flat[i + 1]) or ""))
            except (TypeError, ValueError):
                log.warning("ignoring malformed member entry %r in %s", flat[i], self.keys.nodes)
        return out

    @staticmethod
    def _failures(flat: Any) -> dict[str, int]:
        out: dict[str, int] = {}
        flat = flat or []
        for i in range(0, len(flat) - 1, 2):
            try:
                out[str(text(flat[i]))] = int(text(flat[i + 1]) or "")
            except ValueError:
                out[str(text(flat[i]))] = 0  # malformed: treated as expired, then dropped
        return out

    def claim(
        self, node_id: str, ckeys: list[str], ttl: float, session: str = ""
    ) -> dict[str, int]:
        """Try to take claims; ckey -> the fresh token held now, 0 if another node holds
        it, -1 if no claim may be taken now (a reset window, a late request)."""
        if not ckeys:
            return {}
        _header, rest = self._node_script(
            self._claim,
            [self.keys.left] + [self.keys.claim(c) for c in ckeys],
            [node_id, ms(ttl), session],
        )
        tokens = {c: int(t) for c, t in zip(ckeys, rest[0] or [])}
        for token in tokens.values():
            self.era.note(token)
        return tokens

    def retoken(self, node_id: str, ckey: str, token: int, ttl: float) -> int:
        """A new, larger token for a claim this node holds with ``token`` (an instance
        recreated in place); 0 if the claim is lost, -1 for a late request."""
        _header, rest = self._node_script(
            self._retoken, [self.keys.claim(ckey)], [node_id, token, ms(ttl)]
        )
        new = int(rest[0])
        self.era.note(new)
        return new

    def settle(self, node_id: str, tokens: dict[str, int], ttl: float) -> int:
        """Give the claims this node holds with exactly these tokens ``ttl`` (a lease)
        from now, as their creates returned; returns how many it set (none for a late
        request)."""
        ckeys = list(tokens)
        _header, rest = self._node_script(
            self._settle,
            [self.keys.claim(c) for c in ckeys],
            [node_id, ms(ttl), *(tokens[c] for c in ckeys)],
        )
        return sum(int(flag) for flag in rest[0] or [])

    def release(self, node_id: str, tokens: dict[str, int], announce: bool = True) -> int:
        """Delete the claims this node still holds with exactly these tokens; with
        ``announce``, each config's assignee hears of its claim (protocol.rst §11)."""
        if not tokens:
            return 0
        ckeys = list(tokens)
        _header, rest = self._node_script(
            self._release,
            [self.keys.assignment, *(self.keys.claim(c) for c in ckeys)],
            [
                node_id,
                self.keys.events,
                "1" if announce else "",
                *(tokens[c] for c in ckeys),
                *ckeys,
            ],
        )
        return int(rest[0])

    def read_desired(
        self, node_id: str, handled: list[str], held: Optional[str] = None
    ) -> ShareRead:
        """This node's share (or, holding share version ``held``, what changed in it
        since), and where the configs it handles outside its share belong (for each key
        of ``handled`` that is not in the share: where it went instead)."""
        k = self.keys
        header, (version, flat, mine, removed) = self._node_script(
            self._read_desired,
            [k.desired(node_id), k.configs, k.shares, k.assignment, k.unplaced, k.deltas],
            [node_id, held or "", *handled],
        )
        if header.status != "ok":
            raise redis.TimeoutError("the read of this node's share arrived too late")
        flat = flat or []
        mine = mine or []
        desired = {str(text(flat[i])): text(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}
        placements = {
            str(text(mine[i])): ConfigPlace(
                text(mine[i + 1]), text(mine[i + 2]), mine[i + 3] is not None, bool(mine[i + 4])
            )
            for i in range(0, len(mine) - 4, 5)
        }
        return ShareRead(
            text(version),
            desired,
            placements,
            None if not isinstance(removed, list) else tuple(str(text(c)) for c in removed),
            header.fence,
        )

    def publish(self, message: Message) -> None:
        self.client.publish(self.keys.events, message.encode())

    def report_failure(self, node_id: str, ckey: str, cooldown: float, hint: Message) -> None:
        self._report_failure(
            keys=[self.keys.failures],
            args=[
                protocol.failure_field(node_id, ckey),
                ms(cooldown),
                self.keys.events,
                hint.encode(),
            ],
        )

    def leave(self, node_id: str, session: str, hint: Message) -> bool:
        """Remove this node's membership and desired set, unless another process owns the
        node id by now (a static name), and tell the leader (``hint``, to its inbox);
        True if it left.

        Its description stays (the leaving heartbeats keep it) until :meth:`forget`, so
        the node id is not free for another process while this one still runs instances.
        """
        k = self.keys
        return bool(
            self._leave(
                keys=[k.nodes, k.node(node_id), k.desired(node_id), k.shares, k.leader, k.deltas],
                args=[node_id, session, k.events, hint.encode()],
            )
        )

    def forget(self, node_id: str, tombstone: float, session: str = "") -> None:
        """Last step of leaving: drop every trace of the node and leave a tombstone.

        The tombstone makes a request this node sent earlier, still queued in a stalled
        server, a no-op when it finally runs. Expired tombstones are trimmed here.
        """
        k = self.keys
        self._forget(
            keys=[
                k.left,
                k.nodes,
                k.node(node_id),
                k.desired(node_id),
                k.control,
                k.assignment,
                k.unplaced,
                k.leader,
                k.shares,
                k.deltas,
            ],
            args=[node_id, ms(tombstone), session],
        )

    def resign(self, leader_value: str, hint: Message) -> bool:
        return bool(
            self._resign(
                keys=[self.keys.leader], args=[leader_value, self.keys.events, hint.encode()]
            )
        )

    # -- the leader -------------------------------------------------------------------

    def leader_read(self) -> View:
        """Membership, failures, controls and the live nodes' descriptions, in one round
        trip."""
        k = self.keys
        now, members, failures, flat, control = self._leader_read(
            keys=[k.nodes, k.failures, k.control], args=[k.prefix]
        )
        flat = flat or []
        fields = ("weight", "static", "tags", "capacity")
        infos = {
            str(text(flat[i])): {f: text(flat[i + 1 + j]) for j, f in enumerate(fields)}
            for i in range(0, len(flat) - len(fields), len(fields) + 1)
        }
        return View(
            int(now),
            self._members(members),
            self._failures(failures),
            infos,
            control=_pairs(control),
        )

    # -- the operator (CLI) -----------------------------------------------------------

    def control(self) -> dict[str, str]:
        return {
            str(text(f)): str(text(v)) for f, v in self.client.hgetall(self.keys.control).items()
        }

    def set_paused(self, on: bool, hint: Message) -> None:
        """Pause or resume rebalancing, and tell the leader."""
        if isinstance(self.client, RedisCluster):
            # a cluster pipeline refuses PUBLISH (it has no key); the hint only wakes the
            # leader, which reads the control hash itself, so two calls in order will do
            if on:
                self.client.hset(self.keys.control, protocol.PAUSED, "1")
            else:
                self.client.hdel(self.keys.control, protocol.PAUSED)
            self.publish(hint)
            return
        with self.client.pipeline(transaction=True) as pipe:
            if on:
                pipe.hset(self.keys.control, protocol.PAUSED, "1")
            else:
                pipe.hdel(self.keys.control, protocol.PAUSED)
            pipe.publish(self.keys.events, hint.encode())
            pipe.execute()

    def set_draining(self, node_id: str, on: bool, hint: Message) -> None:
        """Start or stop draining one node, and tell the leader."""
        field = protocol.drain_field(node_id)
        if isinstance(self.client, RedisCluster):
            # two calls, not a transaction: see set_paused
            if on:
                self.client.hset(self.keys.control, field, str(time.time()))
            else:
                self.client.hdel(self.keys.control, field)
            self.publish(hint)
            return
        with self.client.pipeline(transaction=True) as pipe:
            if on:
                pipe.hset(self.keys.control, field, str(time.time()))
            else:
                pipe.hdel(self.keys.control, field)
            pipe.publish(self.keys.events, hint.encode())
            pipe.execute()

    def members(self) -> tuple[int, dict[str, int]]:
        """(server now ms, {node id: expiry ms}) for every member, live or expired."""
        # plain reads (no script), so a read-only user can run `dim status`
        if isinstance(self.client, RedisCluster):
            # a cluster pipeline refuses TIME (it has no key): ask the master of the
            # service's slot, whose clock scored the members
            master = self.client.get_node_from_key(self.keys.nodes)  # type: ignore[no-untyped-call]
            # the members first, then the time: every expiry read was scored at a server
            # time before this one, so none looks further away than node_ttl
            pairs: Any = self.client.zrange(self.keys.nodes, 0, -1, withscores=True)
            # that node's own client: the same reply shape on every redis-py version
            seconds, micros = master.redis_connection.time()
        else:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.time()
                pipe.zrange(self.keys.nodes, 0, -1, withscores=True)
                (seconds, micros), pairs = pipe.execute()
        out: dict[str, int] = {}
        for member, score in pairs or []:
            try:
                out[str(text(member))] = int(float(score))
            except (TypeError, ValueError):
                log.warning("ignoring malformed member entry %r in %s", member, self.keys.nodes)
        return int(seconds) * 1000 + int(micros) // 1000, out

    def node_infos(self, node_ids: list[str]) -> dict[str, dict[str, str]]:
        if not node_ids:
            return {}
        with self.client.pipeline(transaction=False) as pipe:
            for node_id in node_ids:
                pipe.hgetall(self.keys.node(node_id))
            replies = pipe.execute()
        return {
            node_id: {str(text(f)): str(text(v)) for f, v in (reply or {}).items()}
            for node_id, reply in zip(node_ids, replies)
        }

    def running(self, node_ids: list[str]) -> dict[str, int]:
        """Each node -> the instances it reported running with its last heartbeat (the
        health field of its description; 0 if it has none)."""
        if not node_ids:
            return {}
        with self.client.pipeline(transaction=False) as pipe:
            for node_id in node_ids:
                pipe.hget(self.keys.node(node_id), "health")
            replies = pipe.execute()
        return {n: protocol.parse_health(text(r))[0] for n, r in zip(node_ids, replies)}

    def assignment(self) -> dict[str, str]:
        raw = self.client.hgetall(self.keys.assignment)
        return {str(text(c)): str(text(n)) for c, n in raw.items()}

    def configs(self) -> dict[str, str]:
        raw = self.client.hgetall(self.keys.configs)
        return {str(text(c)): str(text(v)) for c, v in raw.items()}

    def claims(self, ckeys: list[str]) -> dict[str, tuple[str, int]]:
        """Current holders of these claims: ckey -> (node, token), for held claims."""
        if not ckeys:
            return {}
        values = self.client.mget([self.keys.claim(c) for c in ckeys])
        out = {}
        for ckey, value in zip(ckeys, values):
            owner = parse_owner(text(value))
            if owner is not None:
                out[ckey] = owner
        return out

    def unplaced(self) -> dict[str, str]:
        """config key -> why the leader could not place it."""
        return _pairs([x for pair in self.client.hgetall(self.keys.unplaced).items() for x in pair])

    def failures(self) -> dict[str, int]:
        raw = self.client.hgetall(self.keys.failures)
        return self._failures([x for pair in raw.items() for x in pair])

    def leader_write(
        self,
        leader_value: str,
        change: Change,
        epoch: int,
        node_id: str,
        deltas: Optional[Mapping[str, Mapping[str, Any]]] = None,
        reset_id: str = "",
    ) -> tuple[int, list[str]]:
        """Apply a change set if ``leader_value`` still leads and no reset window opened
        that ``reset_id`` does not name.

        Returns ``(new version or a :class:`~dim.protocol.WriteRefused` code, nodes
        kept)``: the nodes of ``drop_nodes`` that
        were alive again. Each node of ``deltas`` (the nodes whose share changes, with
        what changes in it: :func:`dim.change.deltas`) gets the new version as its share
        version, its delta stored, and an ``assigned`` hint in its inbox.
        """
        k = self.keys
        hint = f'{{"k":"assigned","n":{json.dumps(node_id)},"e":{epoch}'
        _header, rest = self._node_script(
            self._leader_write,
            [
                k.leader,
                k.assignment,
                k.configs,
                k.version,
                k.nodes,
                k.failures,
                k.control,
                k.unplaced,
                k.shares,
                k.deltas,
            ],
            [
                leader_value,
                k.prefix,
                reset_id,
                json.dumps(change.as_json()),
                k.events,
                hint,
                json.dumps(deltas or {}, separators=(",", ":")),
            ],
        )
        version = int(text(rest[0]) or -1)
        if version > 0:
            self.era.note(version)
        return version, [str(text(n)) for n in rest[1] or []]

    def repair_counts(self, nodes: list[str]) -> tuple[Optional[str], int, dict[str, int]]:
        """The assignment version, and how many entries the assignment and each node's
        desired set hold in Redis."""
        k = self.keys
        version, size, sets = self._repair_read(
            keys=[k.assignment, k.version], args=[k.prefix, "count", *nodes]
        )
        sets = sets or []
        counts = {str(text(sets[i])): int(sets[i + 1]) for i in range(0, len(sets) - 1, 2)}
        return text(version), int(size), counts

    def repair_read(self, nodes: list[str]) -> tuple[dict[str, str], dict[str, set[str]]]:
        """What Redis holds of the placement: (assignment, desired set of each of
        ``nodes``), for the leader to compare with its own copy."""
        k = self.keys
        _version, flat, sets = self._repair_read(
            keys=[k.assignment, k.version], args=[k.prefix, "full", *nodes]
        )
        desired: dict[str, set[str]] = {}
        sets = sets or []
        for i in range(0, len(sets) - 1, 2):
            desired[str(text(sets[i]))] = {str(text(c)) for c in sets[i + 1] or []}
        return _pairs(flat), desired

    # -- read-only views (status, CLI) ------------------------------------------------

    def leader(self) -> Optional[str]:
        return text(self.client.get(self.keys.leader))

    def version(self) -> Optional[str]:
        return text(self.client.get(self.keys.version))


def _pairs(flat: Any) -> dict[str, str]:
    flat = flat or []
    return {str(text(flat[i])): str(text(flat[i + 1])) for i in range(0, len(flat) - 1, 2)}


#: What dim talks to Redis through: a client of one server, or of a Redis Cluster (every
#: key of a service hashes to one slot, so each call and script goes to one master).
Client = Union[redis.Redis, RedisCluster]


def redis_from(target: Union[str, Client], socket_timeout: float) -> Client:
    """A client for a URL (with dim's timeouts; any form :mod:`dim.urls` reads), or the
    caller's own client as is."""
    if isinstance(target, (redis.Redis, RedisCluster)):
        return target
    # given, redis-py does not look its version up in the package metadata for every
    # new connection (about 1 ms each, 10 ms for the first one)
    options: dict[str, Any] = {}
    try:
        from redis.driver_info import DriverInfo  # redis-py 7.1+

        options["driver_info"] = DriverInfo(lib_version=redis.__version__)
    except ImportError:
        if int(redis.__version__.split(".")[0]) >= 5:
            options["lib_version"] = redis.__version__
    return client_from_url(
        target,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        health_check_interval=30,
        # one immediate retry (a connection the server closed); dim's loops retry the
        # rest themselves, instead of redis-py's default backoff holding a loop up
        retry=Retry(NoBackoff(), 1),
        **options,
    )
