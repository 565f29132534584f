"""When a node renewed last, and what follows from it (docs/protocol.rst, section 6).

Pure: the caller passes the monotonic time. Every claim a successful heartbeat renewed
lives in Redis until at least the moment that heartbeat was *sent* plus its TTL, so all
of a node's timing hangs on that one moment:

* the next heartbeat is due ``heartbeat_interval`` after it;
* the node fences itself ``renew_deadline`` after it (``node_ttl - fence_margin``): the
  fence stops every instance while the claims are still sure to be held;
* a claim renewed at ``at`` with ``ttl`` is held until ``at + ttl``, and a call may
  start under it only if it ends, disconnect included, before that.
"""

from __future__ import annotations

import attrs


@attrs.define
class Renewal:
    """The last successful renewal of one node.

    :ivar heartbeat_interval: how often the node renews.
    :ivar renew_deadline: how long after the last renewal the node fences itself.
    :ivar last: monotonic time at which the last successful heartbeat was sent (the
        node's start counts as one: nothing is held before it).
    """

    heartbeat_interval: float
    renew_deadline: float
    last: float

    def renewed(self, sent: float) -> None:
        """A heartbeat sent at ``sent`` renewed everything it carried."""
        self.last = sent

    def heartbeat_in(self, now: float) -> float:
        """Seconds until the next heartbeat is due (<= 0: now)."""
        return self.last + self.heartbeat_interval - now

    def fence_in(self, now: float) -> float:
        """Seconds until the node must fence itself (<= 0: now)."""
        return self.last + self.renew_deadline - now


def held_until(current: float, at: float, ttl: float) -> float:
    """A claim held until ``current`` was renewed at ``at`` for ``ttl``: held until."""
    return max(current, at + ttl)


def covers(held: float, now: float, need: float) -> bool:
    """Does a claim held until ``held`` cover a call that starts ``now`` and needs
    ``need`` seconds (its timeout, the disconnect of what it returns, the margin)?"""
    return now + need <= held
