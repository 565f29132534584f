"""Validation and canonical form of what ``get_config`` returns.

A config is a JSON-serialisable mapping with an ``id`` (int or str), or a bare int/str
that is its own id; ``key=`` (a callable) overrides how the id is read. In Redis a config
is stored under its *config key* (``str(id)``) as the canonical JSON of ``[id, config]``,
so the id keeps its type and any change of content changes the stored text.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, Callable, Optional

import attrs

from dim.errors import ConfigError

log = logging.getLogger(__name__)

#: Ids up to this many characters (URLs fit); Redis keys and hints stay small enough.
MAX_ID_LENGTH = 2048

ConfigId = Any  # int or str
KeyFunc = Callable[[Any], Any]


@attrs.frozen
class Config:
    """One validated config."""

    id: ConfigId
    value: Any
    json: str  # canonical JSON of [id, value]

    @property
    def ckey(self) -> str:
        return str(self.id)


def check_id(config_id: object, where: str) -> ConfigId:
    """Return ``config_id`` if it is a usable id, else raise ConfigError naming it."""
    if isinstance(config_id, bool) or not isinstance(config_id, (int, str)):
        raise ConfigError(
            f"{where}: config id must be an int or a str, got {config_id!r} "
            f"({type(config_id).__name__})",
            config_id,
        )
    if isinstance(config_id, str):
        if not config_id or len(config_id) > MAX_ID_LENGTH:
            raise ConfigError(
                f"{where}: config id must be 1-{MAX_ID_LENGTH} characters, got {config_id!r}",
                config_id,
            )
        if any(ord(ch) < 32 for ch in config_id):
            raise ConfigError(
                f"{where}: config id contains control characters: {config_id!r}", config_id
            )
    return config_id


def canonical(config_id: ConfigId, value: Any) -> str:
    """Canonical JSON of ``[id, value]`` (sorted keys, no spaces, no NaN)."""
    return json.dumps([config_id, value], sort_keys=True, separators=(",", ":"), allow_nan=False)


@attrs.frozen
class Parsed:
    """What one ``get_config`` result holds: the good configs, in order, and why each bad
    item was refused. An item whose id could be read has it in ``bad_ids``, so its last
    good version can stay."""

    configs: dict[str, Config]
    errors: list[ConfigError]
    bad_ids: frozenset[str]


def parse(raw: object, key: Optional[KeyFunc] = None) -> Parsed:
    """Validate what ``get_config`` returned, item by item.

    One bad item (no id, a bad id, a duplicate id, content that is not JSON, a ``key``
    that raises) is refused on its own and named in an error; the other items stand.
    A duplicate id refuses every item with that id (``1`` and ``"1"`` count as
    duplicates): dim cannot tell which one is meant.

    :raises ConfigError: when the result as a whole is not a list.
    """
    if isinstance(raw, (str, bytes, Mapping)) or not isinstance(raw, (list, tuple)):
        raise ConfigError(
            f"get_config must return a list of configs, got {type(raw).__name__}: {_short(raw)}",
            raw,
        )
    out: dict[str, Config] = {}
    errors: list[ConfigError] = []
    bad: set[str] = set()
    for index, item in enumerate(raw):
        where = f"get_config item {index}"
        try:
            config_id = _read_id(item, key, where)
        except ConfigError as exc:
            errors.append(exc)
            continue
        ckey = str(config_id)
        if ckey in out or ckey in bad:
            first = out.pop(ckey, None)
            errors.append(
                ConfigError(
                    f"{where}: duplicate config id {config_id!r}"
                    + (f" (already used by {first.id!r})" if first is not None else ""),
                    config_id,
                )
            )
            bad.add(ckey)
            continue
        try:
            text = canonical(config_id, item)
        except (TypeError, ValueError) as exc:
            error = ConfigError(
                f"{where}: config {config_id!r} is not JSON-serialisable: {exc}", config_id
            )
            error.__cause__ = exc
            errors.append(error)
            bad.add(ckey)
            continue
        out[ckey] = Config(config_id, item, text)
    return Parsed(out, errors, frozenset(bad))


def _read_id(item: object, key: Optional[KeyFunc], where: str) -> ConfigId:
    if key is not None:
        try:
            config_id = key(item)
        except BaseException as exc:  # user code: whatever it raises, this item is bad
            raise ConfigError(f"{where}: key() raised {exc!r} for {_short(item)}", item) from exc
    elif isinstance(item, Mapping):
        if "id" not in item:
            raise ConfigError(f"{where}: config has no 'id': {_short(item)}", item)
        config_id = item["id"]
    elif isinstance(item, (int, str)) and not isinstance(item, bool):
        config_id = item
    else:
        raise ConfigError(
            f"{where}: a config must be a mapping with an 'id' or a bare int/str, got "
            f"{_short(item)} ({type(item).__name__})",
            item,
        )
    return check_id(config_id, where)


def normalize(raw: object, key: Optional[KeyFunc] = None) -> dict[str, Config]:
    """Validate what ``get_config`` returned; config key -> Config, in the given order.

    :raises ConfigError: for the first bad item (see :func:`parse`, which keeps the
        good items instead).
    """
    parsed = parse(raw, key)
    if parsed.errors:
        raise parsed.errors[0]
    return parsed.configs


def decode(ckey: str, text: Optional[str]) -> Optional[Config]:
    """Parse a stored config; None (and a warning) if it is not what dim writes."""
    if text is None:
        return None
    try:
        pair = json.loads(text)
        if not isinstance(pair, list) or len(pair) != 2:
            raise ValueError("not a pair")
        config_id = check_id(pair[0], "stored config")
        if str(config_id) != ckey:
            raise ValueError(f"id {config_id!r} does not match key {ckey!r}")
    except (ValueError, ConfigError) as exc:
        log.warning("ignoring malformed stored config %r: %s", ckey, exc)
        return None
    return Config(config_id, pair[1], text)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
