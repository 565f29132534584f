"""What one node knows of the Redis data it talks to (pure: no I/O, clock injected).

Every Lua script a node runs starts with the same check (``dim/lua/check.lua``), fed by
:meth:`Era.context`: the highest fence value this node has seen, its estimate of the
server's clock, and how late a request of its own may still arrive. With that, the
script itself tells

* a request that arrives after the node stopped waiting for it (``stale``: it sat in a
  stalled server or proxy past the socket timeout) and does nothing with it;
* Redis data that was lost or rewound: the fence counter is missing, lower than what
  this node has seen, or the server's run id changed (a restart, a failover to a
  replica). It then raises the counter back above anything seen and opens a **reset
  window** of ``Settings.reset_window``, during which nobody takes a new claim and
  every node still running an instance takes its claim back;
* a step of the server's wall clock forward (a reply that names a server time further
  ahead of the estimate than the estimate's own uncertainty, the round trip of the reply
  it comes from, plus ``tolerance``): the node says so in its next request, which opens
  a reset window too, because Redis expires keys on its wall clock: every TTL just got
  shorter by the step. A node that stalled while a reply sat unread (a GC pause) is not
  taken for a step: that reply's long round trip widens the uncertainty.

Replies start with the same header (:class:`Header`), which :meth:`Era.observe` reads.
"""

from __future__ import annotations

from typing import Callable, Optional

import attrs


@attrs.frozen
class Header:
    """The first five fields of every node script's reply."""

    status: str  # 'ok', 'stale' (the request came too late and did nothing), ...
    now_ms: int  # server time when the script ran
    fence: int  # the fence counter after the script
    reset_ms: int  # how long the reset window still lasts (0: none)
    reset_id: str  # what opened the window and when ('' when none)

    @classmethod
    def parse(cls, reply: list[object]) -> Header:
        def text(value: object) -> str:
            if isinstance(value, bytes):
                return value.decode("utf-8", "replace")
            return "" if value is None else str(value)

        return cls(
            status=text(reply[0]),
            now_ms=int(text(reply[1]) or 0),
            fence=int(text(reply[2]) or 0),
            reset_ms=max(0, int(text(reply[3]) or 0)),
            reset_id=text(reply[4]),
        )


class Era:
    """One node's knowledge of the server; every store call reads and feeds it.

    :param clock: the node's monotonic clock.
    :param max_delay: how long after it was sent a request of this node may still run
        legitimately (two socket timeouts); ``None`` when unknown (a client the user
        passed without a socket timeout): the lateness check is then off.
    :param window: the reset window (``Settings.reset_window``), in seconds.
    :param tolerance: the smallest forward step of the server's clock taken for one, in
        seconds (``Settings.fence_margin / 2``: a step shorter than the fence margin
        costs no safety, so it need not cost a reset window).
    """

    def __init__(
        self,
        clock: Callable[[], float],
        max_delay: Optional[float],
        window: float,
        tolerance: float = 0.05,
    ) -> None:
        self.clock = clock
        self.max_delay = max_delay
        self.window = window
        self.tolerance = tolerance
        self.seen = 0  # highest fence value (token, epoch, version) seen
        # (monotonic when received, server ms, round trip in s) of the latest reply
        self._server: Optional[tuple[float, int, float]] = None
        self.jumped = False  # the server clock stepped forward: say so next time
        self.reset_until = 0.0  # monotonic end of the reset window known
        self.reset_id = ""

    def __repr__(self) -> str:
        return f"<Era seen={self.seen} reset={self.reset_id or None}>"

    def estimate(self) -> int:
        """The server's time now, in ms (0 before the first reply).

        It is a lower bound: the reply it comes from was computed before it arrived.
        """
        if self._server is None:
            return 0
        at, server_ms, _ = self._server
        return server_ms + int((self.clock() - at) * 1000)

    def context(self) -> str:
        """ARGV[1] of every node script: ``seen est_ms max_delay_ms jumped window_ms``."""
        delay = 0 if self.max_delay is None else int(self.max_delay * 1000)
        return (
            f"{self.seen} {self.estimate()} {delay} {1 if self.jumped else 0} "
            f"{max(1, int(self.window * 1000))}"
        )

    def note(self, value: int) -> None:
        """A fence value (token, epoch, version) this node has seen."""
        if value > self.seen:
            self.seen = value

    def observe(
        self, header: Header, sent: float, received: float, said_jump: bool = False
    ) -> None:
        """Learn from a reply to a request sent at ``sent`` (both monotonic) whose
        context said ``said_jump``."""
        if self.stepped(header.now_ms, received):
            self.jumped = True  # the next request says so
        elif header.status == "ok" and said_jump:
            self.jumped = False  # said, in a request that was accepted
        self._server = (received, header.now_ms, max(0.0, received - sent))
        self.note(header.fence)
        if header.reset_ms > 0:
            self.reset_until = max(self.reset_until, sent + header.reset_ms / 1000)
            self.reset_id = header.reset_id
        elif header.status == "ok":
            self.reset_until = 0.0

    def stepped(self, now_ms: int, received: float) -> bool:
        """Does a server time computed before ``received`` show that the server's clock
        stepped forward since the last reply?

        Without a step, the server's time at ``received`` is at most the estimate plus
        the round trip of the reply the estimate comes from (the server computed that
        reply at some moment of its round trip)."""
        if self._server is None or not now_ms:
            return False
        at, server_ms, rtt = self._server
        expected = server_ms + (received - at) * 1000
        return now_ms - expected > (rtt + self.tolerance) * 1000

    def resetting(self) -> bool:
        """Is a reset window open, as far as this node knows?"""
        return self.clock() < self.reset_until
