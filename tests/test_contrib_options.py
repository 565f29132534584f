"""The Manager's options read from a framework's settings (dim.contrib.options): one list
taken from the Manager's signature, every problem named, every option reaching the node."""

from __future__ import annotations

import inspect
from typing import Any

import attrs
import pytest

from dim import ConfigError, Manager, Settings
from dim.contrib.options import MANAGER_OPTIONS, OptionReader, setting_name
from dim.testing import wait_until

from .helpers import FAST

DJANGO_STYLE = OptionReader("settings.DIM", extra={"AUTOSTART": lambda v: None})
FLASK_STYLE = OptionReader("app.config", prefix="DIM_")


def get_config() -> list[Any]:
    return [{"id": "a", "tags": ["eu"], "rank": 2}, {"id": "b", "tags": [], "rank": 1}]


def create(config: Any) -> Any:
    return config


def test_every_manager_keyword_is_a_setting() -> None:
    """The settings are the Manager's parameters (``redis`` is REDIS_URL), nothing hand-kept."""
    params = [p for p in inspect.signature(Manager.__init__).parameters if p != "self"]
    assert list(MANAGER_OPTIONS) == params
    assert set(DJANGO_STYLE.known) == {setting_name(p) for p in params} | {"AUTOSTART"}
    assert "REDIS_URL" in DJANGO_STYLE.known and "NODE_NAME" in DJANGO_STYLE.known
    assert "DIM_REDIS_URL" in FLASK_STYLE.known and "DIM_PRIORITY" in FLASK_STYLE.known


def test_an_unknown_key_names_itself_and_the_known_ones(redis_url: str) -> None:
    """A typo fails with the bad key and the list of known keys."""
    values = {"REDIS_URL": redis_url, "SERVICE": "s", "GET_CONFIG": get_config}
    values.update(CREATE=create, TAGZ=["eu"])
    with pytest.raises(ConfigError) as caught:
        DJANGO_STYLE.kwargs(values)
    message = str(caught.value)
    assert "settings.DIM has unknown key 'TAGZ'" in message
    assert "'TAGS'" in message and "'CAPACITY'" in message and "'AUTOSTART'" in message
    with pytest.raises(ConfigError, match=r"unknown key 'DIM_TAGZ'.*'DIM_TAGS'"):
        FLASK_STYLE.kwargs(values)


def test_every_problem_is_reported_at_once() -> None:
    """Unknown, missing, unimportable, bad Settings fields and bad values: one problem each."""
    values = {
        "SERVICE": "s",
        "GET_CONFIG": "tests.test_contrib_options.get_config",
        "CREATE": "tests.nowhere.create",
        "SETTINGS": {"heartbeat": 1},
        "CAPACITY": -1,
        "TAGS": "eu",
        "WEIGHT": "heavy",
        "TAGZ": 1,
    }
    found = {(p.kind, p.key) for p in DJANGO_STYLE.problems(values)}
    assert found == {
        ("unknown", "TAGZ"),
        ("missing", "REDIS_URL"),
        ("import", "CREATE"),
        ("settings", "SETTINGS"),
        ("invalid", "CAPACITY"),
        ("invalid", "TAGS"),
        ("invalid", "WEIGHT"),
    }
    messages = {p.key: p.message for p in DJANGO_STYLE.problems(values)}
    assert messages["CREATE"].startswith("settings.DIM['CREATE'] = 'tests.nowhere.create': ")
    assert "capacity must be an integer" in messages["CAPACITY"]
    assert DJANGO_STYLE.problems(["not", "a", "dict"])[0].kind == "type"


@pytest.mark.parametrize(
    "path", ["tests.test_contrib_options.get_config", "tests.test_contrib_options:get_config"]
)
def test_dotted_paths_resolve(path: str, redis_url: str) -> None:
    """A callback may be a dotted path, ``module.attr`` or ``module:attr``."""
    kwargs = DJANGO_STYLE.kwargs(
        {"REDIS_URL": redis_url, "SERVICE": "s", "GET_CONFIG": path, "CREATE": create}
    )
    assert kwargs["get_config"] is get_config
    assert kwargs["redis"] == redis_url


def test_every_option_reaches_the_node(redis_url: str, service: str) -> None:
    """TAGS, CAPACITY, REQUIRES, PRIORITY, NODE_NAME, WEIGHT, SETTINGS: all on the node."""
    kwargs = FLASK_STYLE.kwargs(
        {
            "REDIS_URL": redis_url,
            "SERVICE": service,
            "GET_CONFIG": get_config,
            "CREATE": create,
            "TAGS": ["us"],
            "CAPACITY": 1,
            "REQUIRES": "tags",
            "PRIORITY": "rank",
            "NODE_NAME": "worker-1",
            "WEIGHT": 2.0,
            "SETTINGS": attrs.asdict(FAST),
        }
    )
    assert isinstance(kwargs["settings"], Settings)
    with Manager(**kwargs) as manager:
        # "a" needs the tag eu, which this node lacks; "b" fits its capacity of one
        wait_until(lambda: list(manager.instances) == ["b"], 30)
        node = manager.status().nodes[0]
        assert (node.node_id, node.tags, node.capacity, node.weight) == (
            "worker-1",
            ("us",),
            1,
            2.0,
        )
        assert manager.settings.heartbeat_interval == FAST.heartbeat_interval
