"""Placement constraints: node tags and capacity, config requirements and priority.

Nodes describe themselves (``Manager(tags=..., capacity=...)``, sent with the heartbeat
and stored in the node's description); the leader reads what each config requires and
how much it matters (``Manager(requires=..., priority=...)``, a field name or a callable)
and hands both to :func:`dim.balance.assign_detailed`, which never places a config on a
node that lacks one of its required tags, nor more configs on a node than its capacity.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional, Union

from dim.configs import Config
from dim.errors import ConfigError

_TAG_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")

#: A field name of the config mapping, or a callable of the config value.
Rule = Union[None, str, Callable[[Any], Any]]


def check_tags(tags: object, what: str = "tags") -> frozenset[str]:
    """Validate a collection of tags (strings of letters, digits, ``_ . : -``)."""
    if isinstance(tags, (str, bytes)) or not isinstance(tags, Iterable):
        raise ConfigError(f"{what} must be a collection of strings, got {tags!r}", tags)
    out = set()
    for tag in tags:
        if not isinstance(tag, str) or not _TAG_RE.match(tag):
            raise ConfigError(
                f"{what}: each tag must be 1-64 letters, digits, '_', '.', ':' or '-', got {tag!r}",
                tag,
            )
        out.add(tag)
    return frozenset(out)


def check_capacity(capacity: object) -> Optional[int]:
    if capacity is None:
        return None
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise ConfigError(f"capacity must be an integer >= 0 or None, got {capacity!r}", capacity)
    return capacity


def check_rule(name: str, rule: object) -> Rule:
    if rule is None or callable(rule):
        return rule
    if isinstance(rule, str) and rule:
        return rule
    raise ConfigError(f"{name} must be a config field name or a callable, got {rule!r}", rule)


def format_tags(tags: Iterable[str]) -> str:
    return ",".join(sorted(tags))


def parse_tags(text: Optional[str]) -> frozenset[str]:
    """Tags from a node's description (foreign data: malformed tags are dropped)."""
    if not text:
        return frozenset()
    return frozenset(t for t in text.split(",") if _TAG_RE.match(t))


def parse_capacity(text: Optional[str]) -> Optional[int]:
    try:
        value = int(text) if text else None
    except ValueError:
        return None
    return value if value is None or value >= 0 else None


def parse_weight(value: Optional[str]) -> float:
    """A node's weight from its description: 1.0 when missing or not a positive number."""
    try:
        weight = float(value) if value is not None else 1.0
    except ValueError:
        return 1.0
    return weight if weight > 0 and weight < float("inf") else 1.0


def _evaluate(name: str, rule: Rule, config: Config) -> Any:
    """The rule's value for one config: None without a rule or a value."""
    if rule is None:
        return None
    if not callable(rule):
        value = config.value
        return value.get(rule) if isinstance(value, Mapping) else None
    try:
        return rule(config.value)
    except BaseException as exc:  # user code: whatever it raises, this config is bad
        raise ConfigError(f"{name} raised {exc!r} for config {config.id!r}", config.id) from exc


class Rules:
    """What each config requires (tags) and its priority, from the Manager's rules."""

    def __init__(self, requires: Rule, priority: Rule) -> None:
        self.requires = check_rule("requires", requires)
        self.priority = check_rule("priority", priority)

    @property
    def active(self) -> bool:
        return self.requires is not None or self.priority is not None

    def evaluate(
        self, configs: Mapping[str, Config]
    ) -> tuple[dict[str, frozenset[str]], dict[str, int]]:
        """``(config key -> required tags, config key -> priority)`` for the configs that
        have them.

        :raises ConfigError: naming the config and the bad value.
        """
        required, priorities, errors = self.evaluate_each(configs)
        if errors:
            raise next(iter(errors.values()))
        return required, priorities

    def evaluate_each(
        self, configs: Mapping[str, Config]
    ) -> tuple[dict[str, frozenset[str]], dict[str, int], dict[str, ConfigError]]:
        """Like :meth:`evaluate`, config by config: a config whose rule fails is left out
        of the first two and named in the third (config key -> error)."""
        required: dict[str, frozenset[str]] = {}
        priorities: dict[str, int] = {}
        errors: dict[str, ConfigError] = {}
        for ckey, config in configs.items():
            try:
                needs = _evaluate("requires", self.requires, config)
                tags = (
                    None
                    if needs is None
                    else check_tags(needs, f"requires of config {config.id!r}")
                )
                rank = _evaluate("priority", self.priority, config)
                if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
                    raise ConfigError(
                        f"priority of config {config.id!r} must be an int, got {rank!r}", rank
                    )
            except ConfigError as exc:
                errors[ckey] = exc
                continue
            if tags:
                required[ckey] = tags
            if rank:
                priorities[ckey] = rank
        return required, priorities, errors


def eligible_nodes(
    required: Mapping[str, frozenset[str]], tags: Mapping[str, frozenset[str]]
) -> dict[str, frozenset[str]]:
    """config key -> the nodes having every tag it requires (computed once per tag set)."""
    by_set: dict[frozenset[str], frozenset[str]] = {}
    out: dict[str, frozenset[str]] = {}
    for ckey, needs in required.items():
        nodes = by_set.get(needs)
        if nodes is None:
            # one object per tag set: assign() groups configs by it cheaply
            nodes = by_set[needs] = frozenset(n for n, have in tags.items() if needs <= have)
        out[ckey] = nodes
    return out
