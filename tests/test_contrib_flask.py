"""The Flask extension's options, in this process: every Manager keyword as a ``DIM_*``
config key or a keyword of ``Dim()``/``init_app()``, and no autostart for a testing app.

(``flask dim ...`` run for real is in test_web_commands.py.)
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import redis
from flask import Flask

from dim import ConfigError
from dim.contrib.flask import Dim
from dim.keys import Keys
from dim.testing import wait_until

from .helpers import FAST

DEADLINE = 30.0


def get_config() -> list[Any]:
    return [{"id": "a", "tags": ["eu"], "rank": 2}, {"id": "b", "tags": [], "rank": 1}]


def create(config: Any) -> Any:
    return config


def make_app(redis_url: str, service: str, **config: Any) -> Flask:
    app = Flask(f"app-{service}")
    app.config.update(DIM_REDIS_URL=redis_url, DIM_SERVICE=service, DIM_SETTINGS=attrs.asdict(FAST))
    app.config.update(config)
    return app


def test_every_manager_option_is_a_dim_config_key(redis_url: str, service: str) -> None:
    """DIM_TAGS, _CAPACITY, _REQUIRES, _PRIORITY, _NODE_NAME, _WEIGHT and dotted callbacks."""
    app = make_app(
        redis_url,
        service,
        DIM_GET_CONFIG="tests.test_contrib_flask.get_config",
        DIM_CREATE="tests.test_contrib_flask:create",
        DIM_TAGS=["us"],
        DIM_CAPACITY=1,
        DIM_REQUIRES="tags",
        DIM_PRIORITY="rank",
        DIM_NODE_NAME="web-1",
        DIM_WEIGHT=2.0,
    )
    dim_ext = Dim(app)
    try:
        manager = dim_ext.manager
        # "a" needs the tag eu, which this node lacks; "b" fits its capacity of one
        wait_until(lambda: list(manager.instances) == ["b"], DEADLINE)
        node = manager.status().nodes[0]
        assert (node.node_id, node.tags, node.capacity, node.weight) == ("web-1", ("us",), 1, 2.0)
    finally:
        dim_ext.stop()


def test_init_app_beats_config_beats_the_constructor(redis_url: str, service: str) -> None:
    """An option given to init_app wins over DIM_*, which wins over Dim(...)."""
    dim_ext = Dim(get_config=get_config, create=create, tags=["ctor"], capacity=5, weight=3.0)
    app = make_app(redis_url, service, DIM_TAGS=["config"], DIM_CAPACITY=4)
    dim_ext.init_app(app, tags=["init"])
    try:
        node = wait_until(lambda: dim_ext.manager.status().nodes, DEADLINE)[0]
        assert (node.tags, node.capacity, node.weight) == (("init",), 4, 3.0)
    finally:
        dim_ext.stop()


def test_an_unknown_option_names_itself(redis_url: str, service: str) -> None:
    """A DIM_* typo or an unknown keyword fails with its name and the known ones."""
    app = make_app(redis_url, service, DIM_TAGZ=["eu"])
    with pytest.raises(ConfigError, match=r"unknown key 'DIM_TAGZ'; known: \[.*'DIM_TAGS'"):
        Dim(app, get_config=get_config, create=create)
    with pytest.raises(ConfigError, match=r"unknown option 'tagz'.*'tags'"):
        Dim(get_config=get_config, create=create, tagz=["eu"])
    with pytest.raises(ConfigError, match=r"app.config\['DIM_CAPACITY'\]: capacity must be"):
        Dim(make_app(redis_url, service, DIM_CAPACITY="two"), get_config=list, create=str)


def test_a_testing_app_does_not_autostart(
    redis_url: str, redis_client: redis.Redis, service: str
) -> None:
    """app.testing: init_app starts nothing (unless DIM_AUTOSTART says so); start() does."""
    dim_ext = Dim(make_app(redis_url, service, TESTING=True), get_config=list, create=str)
    assert dim_ext.manager.node_id is None
    assert list(redis_client.scan_iter(match=Keys(service).prefix + "*")) == []
    try:
        assert dim_ext.start() is dim_ext.manager
        assert dim_ext.manager.node_id is not None
    finally:
        dim_ext.stop()
    explicit = make_app(redis_url, service, TESTING=True, DIM_AUTOSTART=True)
    dim_ext = Dim(explicit, get_config=list, create=str)
    try:
        assert dim_ext.manager.node_id is not None
    finally:
        dim_ext.stop()
