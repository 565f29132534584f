"""dim's pytest plugin, loaded through its entry point in a pytest of its own: the
example test of docs/testing.rst passes with the plugin's fixtures, on a private server
that is gone when the session ends."""

from __future__ import annotations

import re

import psutil  # type: ignore[import-untyped]
import pytest

from .helpers import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
pytest_plugins = ["pytester"]


def docs_example() -> str:
    """The code block that starts with ``# test_feeds.py``, dedented."""
    page = (ROOT / "docs" / "testing.rst").read_text()
    rest = page.split("    # test_feeds.py\n", 1)[1]
    match = re.match(r"((?:    .*\n|\n)+)", rest)
    assert match is not None
    return "\n".join(line[4:] for line in match.group(1).splitlines()) + "\n"


def test_the_documented_example_passes_with_the_plugins_fixtures(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_feeds=docs_example())
    pytester.makepyfile(
        test_server="""
        def test_the_server_is_private(dim_redis, dim_redis_server):
            assert dim_redis == dim_redis_server.url
            assert ":6379/" not in dim_redis
            print("SERVER-PID", dim_redis_server.pid)
        """
    )
    # a pytest of its own: plugins are found through the installed entry points
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s", "-q")
    result.assert_outcomes(passed=2)
    pids = [int(line.split()[-1]) for line in result.outlines if "SERVER-PID" in line]
    assert len(pids) == 1 and not psutil.pid_exists(pids[0])


def test_the_fixtures_are_named_in_fixtures_help(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--fixtures", "-p", "no:cacheprovider")
    text = result.stdout.str()
    for name in ("dim_redis", "dim_service", "dim_settings"):
        assert re.search(rf"^{name}\b", text, re.MULTILINE), name
