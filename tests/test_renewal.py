"""A node's timing (:mod:`dim.renewal`) on an injected clock: no Redis, no threads.

The property behind the fence: whatever the settings and whenever the heartbeats come
(or stop coming), a node fences itself, and the disconnects of its instances return
within their budget, before any claim its heartbeats renewed can expire in Redis."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dim import Settings
from dim.renewal import Renewal, covers, held_until


def test_the_next_heartbeat_and_the_fence_hang_on_the_last_renewal() -> None:
    renewal = Renewal(heartbeat_interval=1.0, renew_deadline=3.75, last=100.0)
    assert renewal.heartbeat_in(100.5) == 0.5
    assert renewal.fence_in(103.0) == 0.75
    renewal.renewed(102.0)
    assert renewal.heartbeat_in(103.0) == 0.0 and renewal.fence_in(103.0) == 2.75


def test_a_claim_covers_a_call_only_if_the_call_ends_before_it_expires() -> None:
    assert held_until(10.0, at=8.0, ttl=5.0) == 13.0
    assert held_until(14.0, at=8.0, ttl=5.0) == 14.0  # a late reply never shortens it
    assert covers(13.0, now=10.0, need=3.0) and not covers(13.0, now=10.0, need=3.01)


@given(
    heartbeat=st.floats(0.01, 5.0),
    ttl_beats=st.floats(2.01, 50.0),
    disconnect=st.floats(0.01, 60.0),
    gaps=st.lists(st.floats(0.0, 20.0), min_size=1, max_size=30),
)
def test_the_fence_and_its_disconnects_end_before_any_renewed_claim_expires(
    heartbeat: float, ttl_beats: float, disconnect: float, gaps: list[float]
) -> None:
    s = Settings(
        heartbeat_interval=heartbeat,
        node_ttl=heartbeat * ttl_beats,
        leader_ttl=heartbeat * ttl_beats,
        disconnect_timeout=disconnect,
    )
    now = 0.0
    renewal = Renewal(s.heartbeat_interval, s.renew_deadline, last=now)
    held = now + s.lease  # a claim taken at the start, renewed by each heartbeat
    for gap in gaps:
        if gap <= renewal.fence_in(now):
            now += gap  # a heartbeat got through in time: it renews the claim
            renewal.renewed(now)
            held = held_until(held, now, s.lease)
            continue
        # no renewal reached Redis: the node fences when fence_in runs out, and the
        # disconnects it starts then return within disconnect_timeout
        fenced_at = now + renewal.fence_in(now)
        assert fenced_at + s.disconnect_timeout + s.fence_margin <= held + 1e-9
        return
