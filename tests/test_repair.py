"""The leader repairs what Redis holds when it disagrees with the placement (a write lost
in a failover, a node that came back between the leader's read and its write), and no
node acts on a desired entry that the assignment contradicts.

The disagreement is made by hand, on a running cluster, with the commands a lost write
would have left undone: a real Redis, real managers, nothing mocked.
"""

from __future__ import annotations

import redis

from dim.admin import Admin
from dim.keys import Keys
from dim.testing import wait_until

from .helpers import FAST, Cluster

# the leader compares Redis with its copy every config_interval (0.2 s in FAST)
REPAIRED_WITHIN = 10 * FAST.config_interval + 2.0


def owners(cluster: Cluster) -> dict[int, str]:
    """config id -> the node whose manager runs it."""
    return {cid: nodes[0] for cid, nodes in cluster.placement().items() if len(nodes) == 1}


def test_a_lost_desired_entry_is_repaired(
    redis_url: str, service: str, redis_client: redis.Redis
) -> None:
    """An entry missing from a node's desired set (and its assignment) is written back
    within a few config_interval, and the config runs again where it belongs."""
    cluster = Cluster(redis_url, service, list(range(6)))
    keys = Keys(service)
    try:
        cluster.add(2)
        cluster.wait_balanced()
        placed = owners(cluster)
        victim, node = 0, placed[0]
        # what a lost write leaves: the config in neither the assignment nor the share
        redis_client.srem(keys.desired(node), "0")
        redis_client.hdel(keys.assignment, "0")

        def repaired() -> bool:
            return (
                redis_client.sismember(keys.desired(node), "0")
                and redis_client.hget(keys.assignment, "0") == node.encode()
            )

        wait_until(repaired, REPAIRED_WITHIN, message="the leader did not repair the entry")
        cluster.wait_settled()
        assert owners(cluster)[victim] == node  # repaired in place: nothing moved
        assert cluster.ledger.overlaps() == []
    finally:
        cluster.stop()


def test_a_stale_desired_entry_is_ignored_and_removed(
    redis_url: str, service: str, redis_client: redis.Redis
) -> None:
    """A node whose desired set names a config the assignment gives to another node does
    not claim it, and the leader removes the stale entry."""
    cluster = Cluster(redis_url, service, list(range(6)))
    keys = Keys(service)
    try:
        a, b = cluster.add(2)
        cluster.wait_balanced()
        placed = owners(cluster)
        theirs = next(cid for cid, node in placed.items() if node == a.node_id)
        assert b.node_id is not None
        # counted after the first settle: on a server up for longer than the reset window,
        # A may place every config before B joins, and some then move to B
        created_by_b = cluster.ledger.create_count(b.node_id)
        # a stale entry (an old write replayed): B is told to run one of A's configs
        redis_client.sadd(keys.desired(b.node_id), str(theirs))
        wait_until(
            lambda: not redis_client.sismember(keys.desired(b.node_id), str(theirs)),
            REPAIRED_WITHIN,
            message="the stale entry was not removed",
        )
        cluster.wait_settled()
        assert owners(cluster)[theirs] == a.node_id
        # B never created it: no create on B since the stale entry appeared
        assert cluster.ledger.create_count(b.node_id) == created_by_b
        assert cluster.ledger.overlaps() == []
    finally:
        cluster.stop()


def test_a_lost_assignment_entry_is_repaired(
    redis_url: str, service: str, redis_client: redis.Redis
) -> None:
    """A write lost with its version (the assignment entry and the version back as they
    were before) is put back; the config keeps running where it ran meanwhile."""
    cluster = Cluster(redis_url, service, list(range(6)))
    keys = Keys(service)
    try:
        a, b = cluster.add(2)
        cluster.wait_balanced()
        placed = owners(cluster)
        theirs = next(cid for cid, node in placed.items() if node == a.node_id)
        assert b.node_id is not None and a.node_id is not None
        # counted after the first settle: A may place all six before B joins (on a server
        # up for longer than the reset window), and then three move to B
        created = cluster.ledger.create_count()
        # the entry as an older write left it, and the version that went with it
        redis_client.hset(keys.assignment, str(theirs), b.node_id)
        redis_client.set(keys.version, int(redis_client.get(keys.version)) - 1)
        wait_until(
            lambda: redis_client.hget(keys.assignment, str(theirs)) == a.node_id.encode(),
            REPAIRED_WITHIN,
            message="the assignment entry was not repaired",
        )
        cluster.wait_settled()
        assert owners(cluster)[theirs] == a.node_id
        assert cluster.ledger.create_count() == created  # nothing stopped meanwhile
        assert cluster.ledger.overlaps() == []
    finally:
        cluster.stop()


def test_a_config_kept_outside_a_share_stops_when_given_to_another_node(
    redis_url: str, service: str, redis_client: redis.Redis
) -> None:
    """A node keeps running a config its share lost while nobody else is meant to run it
    (unassigned, still existing); once the assignment gives it to another node, by a
    write that does not touch the first node's share (so no hint or share version tells
    it), the first node still stops it within a few heartbeats and the other runs it."""
    cluster = Cluster(redis_url, service, list(range(4)))
    keys = Keys(service)
    try:
        a, b = cluster.add(2)
        cluster.wait_balanced()
        admin = Admin(redis_url, service=service)
        admin.pause()  # the leader holds everything where it is: no repair interferes
        wait_until(lambda: any(m._node.leader._paused for m in (a, b)), 5)  # type: ignore[union-attr]
        victim = next(iter(a.instances))
        ckey = str(victim)

        def bump(node: str) -> str:
            # a new share version (a fence value, as a leader write would take)
            version = str(redis_client.incr(keys.fence))
            redis_client.hset(keys.shares, node, version)
            return version

        # A's share loses the config, which is assigned to nobody: A reads, keeps it
        redis_client.srem(keys.desired(a.node_id), ckey)
        redis_client.hdel(keys.assignment, ckey)
        version = bump(a.node_id)
        wait_until(lambda: a._node.reconciler.version == version, 5)  # type: ignore[union-attr]
        assert victim in a.instances
        # now it is B's, by a write to B's share alone
        redis_client.hset(keys.assignment, ckey, b.node_id)
        redis_client.sadd(keys.desired(b.node_id), ckey)
        bump(b.node_id)
        wait_until(
            lambda: victim in b.instances and victim not in a.instances,
            5,
            message="the kept config did not move to its new node",
        )
        assert cluster.ledger.overlaps() == []
        admin.resume()
    finally:
        cluster.stop()


def test_a_contested_config_keeps_running_until_the_leader_repairs_it(
    redis_url: str, service: str, redis_client: redis.Redis
) -> None:
    """A node whose desired set names a config the assignment gives to another node
    (a lost write) neither stops nor starts it: it keeps running it, heartbeat after
    heartbeat, for as long as the leader leaves the disagreement in place (paused)."""
    cluster = Cluster(redis_url, service, list(range(4)))
    keys = Keys(service)
    try:
        a, b = cluster.add(2)
        cluster.wait_balanced()
        admin = Admin(redis_url, service=service)
        admin.pause()
        wait_until(lambda: any(m._node.leader._paused for m in (a, b)), 5)  # type: ignore[union-attr]
        victim = next(iter(a.instances))
        # the assignment says B, A's desired set still names it; A reads its share
        redis_client.hset(keys.assignment, str(victim), b.node_id)
        version = str(redis_client.incr(keys.fence))
        redis_client.hset(keys.shares, a.node_id, version)
        wait_until(lambda: a._node.reconciler.version == version, 5)  # type: ignore[union-attr]
        # ten heartbeats later A still runs it (and B never started it)
        renewal = a._node.renewal  # type: ignore[union-attr]
        later = renewal.last + 10 * FAST.heartbeat_interval
        wait_until(lambda: renewal.last > later, 5)
        assert victim in a.instances and victim not in b.instances
        # (the leader's repair compares counts first, which this swap leaves equal: put
        # the entry back as the repair of a lost write would)
        redis_client.hset(keys.assignment, str(victim), a.node_id)
        admin.resume()
        cluster.wait_balanced()
        assert cluster.ledger.overlaps() == []
    finally:
        cluster.stop()
