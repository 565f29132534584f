"""The structured fields of dim's log records.

A record about a node, a config, a leader's epoch or a fencing token carries them as
attributes (passed with ``extra=``), so that a JSON or structured handler can index them
without parsing the message: ``record.dim_node``, ``record.dim_config`` (the config's
id, as ``get_config`` gave it), ``record.dim_epoch`` and ``record.dim_token``. A record
has only the fields its call knew; read them with ``getattr(record, "dim_config",
None)``. The ``dim_`` prefix keeps them clear of :class:`logging.LogRecord`'s own
attributes and of other libraries' fields.

>>> fields("web-1-a3f2c1", config=7, token=42)
{'dim_node': 'web-1-a3f2c1', 'dim_config': 7, 'dim_token': 42}
>>> fields(epoch=3)
{'dim_epoch': 3}
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    _Adapter = logging.LoggerAdapter[logging.Logger]
else:  # not subscriptable at run time before Python 3.11
    _Adapter = logging.LoggerAdapter

NODE = "dim_node"
CONFIG = "dim_config"
EPOCH = "dim_epoch"
TOKEN = "dim_token"


def fields(
    node: Optional[str] = None,
    *,
    config: Any = None,
    epoch: Optional[int] = None,
    token: Optional[int] = None,
) -> dict[str, Any]:
    """The ``extra=`` mapping of one log call: the fields that are known (not None)."""
    out: dict[str, Any] = {}
    if node is not None:
        out[NODE] = node
    if config is not None:
        out[CONFIG] = config
    if epoch is not None:
        out[EPOCH] = epoch
    if token is not None:
        out[TOKEN] = token
    return out


class NodeLog(_Adapter):
    """A module's logger for one node: every record carries ``dim_node`` (and
    ``dim_epoch`` while ``epoch()`` gives one), besides the fields of the call's own
    ``extra=`` (``extra=fields(config=..., token=...)``).

    :param logger: the module's logger (its name stays the record's name).
    :param node: the node id.
    :param epoch: the node's leader epoch now, or None (read at each record).
    """

    def __init__(
        self,
        logger: logging.Logger,
        node: str,
        epoch: Callable[[], Optional[int]] = lambda: None,
    ) -> None:
        super().__init__(logger, {})
        self.node = node
        self._epoch = epoch

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = fields(self.node, epoch=self._epoch())
        extra.update(kwargs.get("extra") or {})
        kwargs["extra"] = extra
        return msg, kwargs
