"""Timing and retry settings of a manager, validated together and frozen."""

from __future__ import annotations

import math
from typing import Any, Optional

import attrs

from dim.errors import ConfigError


def _positive_number(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(
            f"setting {attribute.name} must be a number of seconds, got {value!r}", value
        )
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"setting {attribute.name} must be > 0, got {value!r}", value)


def _positive_int(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"setting {attribute.name} must be an integer >= 1, got {value!r}", value)


def _non_negative_number(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(
            f"setting {attribute.name} must be a number of seconds, got {value!r}", value
        )
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"setting {attribute.name} must be >= 0, got {value!r}", value)


def _optional_positive_int(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        _positive_int(instance, attribute, value)


def _seconds(default: float) -> Any:
    return attrs.field(default=default, validator=_positive_number)


@attrs.frozen
class Settings:
    """How often dim talks to Redis, how long leases live, and how patient it is.

    All durations are in seconds. The instance is immutable and checked as a whole when it
    is built, so a bad combination fails at construction with :class:`~dim.ConfigError`
    naming the setting::

        >>> Settings(heartbeat_interval=0.5, node_ttl=3).node_ttl
        3
        >>> Settings(heartbeat_interval=2, node_ttl=3)
        Traceback (most recent call last):
        ...
        dim.errors.ConfigError: setting node_ttl (3) must be more than twice heartbeat_interval (2)

    :param heartbeat_interval: one heartbeat (one Redis round trip) per node per interval.
    :param node_ttl: how long a node and its claims live without a heartbeat. A node that
        cannot renew for ``node_ttl - max(heartbeat_interval, node_ttl / 4)`` stops its
        instances.
    :param leader_ttl: how long the leader lock lives without renewal.
    :param healthcheck_interval: how often each instance's ``healthcheck`` runs.
    :param healthcheck_timeout: a ``healthcheck`` that takes longer counts as failed.
    :param config_interval: how often the leader calls ``get_config``.
    :param create_attempts: attempts of ``create`` on one node before the config is handed
        to another node for ``failure_cooldown``.
    :param create_timeout: a ``create`` that takes longer counts as failed (the late
        instance, if it ever arrives, is disconnected and reported). The claim of a
        config being created lives long enough to cover it (see :attr:`create_lease`).
    :param create_backoff: first wait between ``create`` attempts; doubles each time,
        capped at ``create_backoff_max``.
    :param create_backoff_max: the longest wait between ``create`` attempts.
    :param failure_cooldown: how long a node that failed a config is avoided for it.
    :param disconnect_timeout: the budget of one ``disconnect``. Every claim lives long
        enough for its instance to be disconnected within this budget after the node
        fenced itself (see :attr:`lease`); a ``disconnect`` that overruns it is reported
        (``DISCONNECT_TIMEOUT``) and only the fencing token protects from it.
    :param config_timeout: a ``get_config`` (with ``key`` and the placement rules) that
        takes longer is abandoned and the last good config kept; it runs on its own
        thread, so the leader keeps balancing meanwhile.
    :param connect_timeout: how long ``start()`` retries an unreachable Redis before it
        raises :class:`~dim.RedisUnavailableError`.
    :param max_workers: how many ``create`` calls run at once on a node (within their
        ``create_timeout``: one that overruns no longer counts; a ``disconnect`` never
        waits for a worker).
    :param max_concurrent_moves: at most this many running instances are being moved
        from one node to another at any moment, cluster-wide (None: no limit). Configs
        that run nowhere (a new config, a dead node's) are placed at once whatever the
        limit; the moves beyond it wait until earlier ones have arrived.
    :param rebalance_delay: after the membership changes, wait until it has been quiet
        this long before moving running instances (0: move at once), so a burst of joins
        or a rolling deploy causes a few rebalances, not one per node. Configs that run
        nowhere are placed at once. The wait is at most ``10 * rebalance_delay``.
    :param rejoin_grace: how long the configs of a node with a static ``node_name`` wait
        for it to come back after it stopped or died (0: they move at once). They run
        nowhere meanwhile: the price of not moving them twice during a restart. A change
        of leader during the grace ends it.
    """

    heartbeat_interval: float = _seconds(1.0)
    node_ttl: float = _seconds(5.0)
    leader_ttl: float = _seconds(5.0)
    healthcheck_interval: float = _seconds(10.0)
    healthcheck_timeout: float = _seconds(5.0)
    config_interval: float = _seconds(10.0)
    create_attempts: int = attrs.field(default=3, validator=_positive_int)
    create_timeout: float = _seconds(10.0)
    create_backoff: float = _seconds(0.5)
    create_backoff_max: float = _seconds(10.0)
    failure_cooldown: float = _seconds(30.0)
    disconnect_timeout: float = _seconds(5.0)
    config_timeout: float = _seconds(10.0)
    connect_timeout: float = _seconds(10.0)
    max_workers: int = attrs.field(default=8, validator=_positive_int)
    max_concurrent_moves: Optional[int] = attrs.field(
        default=None, validator=_optional_positive_int
    )
    rebalance_delay: float = attrs.field(default=0.0, validator=_non_negative_number)
    rejoin_grace: float = attrs.field(default=0.0, validator=_non_negative_number)

    def __attrs_post_init__(self) -> None:
        for name in ("node_ttl", "leader_ttl"):
            ttl = getattr(self, name)
            if ttl <= 2 * self.heartbeat_interval:
                raise ConfigError(
                    f"setting {name} ({ttl}) must be more than twice heartbeat_interval "
                    f"({self.heartbeat_interval})",
                    ttl,
                )
        if self.create_backoff_max < self.create_backoff:
            raise ConfigError(
                f"setting create_backoff_max ({self.create_backoff_max}) must be at least "
                f"create_backoff ({self.create_backoff})",
                self.create_backoff_max,
            )

    @property
    def fence_margin(self) -> float:
        """Slack on both sides of the fence: ``max(heartbeat_interval, node_ttl / 4)``.

        It covers a fence thread that runs late on a busy machine, and the delay between
        a renewal being sent and Redis applying it.
        """
        return max(self.heartbeat_interval, self.node_ttl / 4)

    @property
    def renew_deadline(self) -> float:
        """Seconds without a successful renewal after which a node fences itself
        (``node_ttl - fence_margin``, 3.75 s by default): it starts disconnecting every
        instance at once, on its own clock, without waiting for Redis."""
        return self.node_ttl - self.fence_margin

    @property
    def lease(self) -> float:
        """How long a renewal keeps the claim of a running instance alive, in Redis.

        ``renew_deadline + disconnect_timeout + fence_margin`` (10 s by default): a node
        cut off from Redis fences itself at the renew deadline and its disconnects
        return within their budget, all before any of its claims can expire. This is
        also how long a crashed node's configs wait before another node may take them.
        """
        return self.renew_deadline + self.disconnect_timeout + self.fence_margin

    @property
    def create_lease(self) -> float:
        """How long the claim of a config being created lives (17.25 s by default).

        A ``create`` attempt starts only while the claim covers the whole attempt and the
        disconnect of what it returns: ``create_timeout + disconnect_timeout +
        fence_margin``, plus one heartbeat so the next attempt may start before the next
        renewal.
        """
        return (
            self.create_timeout
            + self.disconnect_timeout
            + self.fence_margin
            + self.heartbeat_interval
        )

    @property
    def reset_window(self) -> float:
        """After Redis lost or rewound data, how long no node takes a new claim: the
        longest lease, so that any instance still running somewhere has either taken
        its claim back or been stopped by its fence."""
        return max(self.lease, self.create_lease)

    @property
    def stop_timeout(self) -> float:
        """The bound on :meth:`Manager.stop` when Redis answers: every disconnect runs at
        once, so ``disconnect_timeout`` plus one second for the threads and the last
        round trips."""
        return self.disconnect_timeout + 1.0

    @property
    def socket_timeout(self) -> float:
        """Socket timeout for the Redis connections dim opens itself."""
        return max(self.heartbeat_interval, 0.25)

    def replace(self, **changes: Any) -> Settings:
        """Return a copy with some settings changed (validated again)."""
        return attrs.evolve(self, **changes)
