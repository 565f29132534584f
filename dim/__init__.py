"""dim: spread configured long-lived instances over the processes of a service.

Each config runs in exactly one process, moves as little as possible when processes come
and go, and heals itself when an instance or a process fails. Coordination goes through
Redis. See :class:`Manager`.
"""

from __future__ import annotations

import logging

from dim.errors import (
    CallbackError,
    CallTimeout,
    ConfigError,
    CreateError,
    DimError,
    ForkedError,
    MessageError,
    RedisUnavailableError,
    StateError,
)
from dim.events import Event, EventType
from dim.manager import Manager
from dim.settings import Settings
from dim.slots import Lease
from dim.status import ClusterStatus, ConfigStatus, NodeStatus

__version__ = "0.1.0"

# a library adds no handler of its own, but this one keeps dim's records away from
# logging's last-resort handler (stderr) in a program that configures no logging
logging.getLogger("dim").addHandler(logging.NullHandler())

__all__ = [
    "CallTimeout",
    "CallbackError",
    "ClusterStatus",
    "ConfigError",
    "ConfigStatus",
    "CreateError",
    "DimError",
    "Event",
    "EventType",
    "ForkedError",
    "Lease",
    "Manager",
    "MessageError",
    "NodeStatus",
    "RedisUnavailableError",
    "Settings",
    "StateError",
    "__version__",
]
