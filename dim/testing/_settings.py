"""Settings that make a test cluster converge in a fraction of a second."""

from __future__ import annotations

from typing import Any

from dim.settings import Settings


def fast_settings(**overrides: Any) -> Settings:
    """Short heartbeats, leases and timeouts for tests, with ``overrides`` applied.

    A heartbeat every 0.1 s, a node lapses after 1 s, ``create`` and ``disconnect``
    have 2 s each. The leases follow (``Settings.lease``, ``create_lease``): a crashed
    node's configs wait its lease before they run elsewhere, and on a server started a
    moment ago the first claims wait one ``reset_window`` (once per server). Keep your
    callbacks within these budgets, or raise them here.
    """
    values: dict[str, Any] = {
        "heartbeat_interval": 0.1,
        "node_ttl": 1.0,
        "leader_ttl": 1.0,
        "healthcheck_interval": 0.2,
        "healthcheck_timeout": 1.0,
        "config_interval": 0.5,
        "create_backoff": 0.05,
        "create_backoff_max": 0.5,
        "create_timeout": 2.0,
        "disconnect_timeout": 2.0,
        "connect_timeout": 5.0,
    }
    values.update(overrides)
    return Settings(**values)
