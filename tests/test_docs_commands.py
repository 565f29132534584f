"""The README's two commands are the ones users run and CI runs."""

from __future__ import annotations

import re

from .helpers import ROOT


def readme_commands() -> list[str]:
    text = (ROOT / "README.rst").read_text()
    block = text.split("The two commands\n================\n", 1)[1].split("\n\n\n", 1)[0]
    return [
        line.split("$ ", 1)[1].split("#", 1)[0].strip()
        for line in block.splitlines()
        if line.strip().startswith("$ ")
    ]


def test_the_readme_gives_two_commands_one_demo_one_tests() -> None:
    demo, tests = readme_commands()
    assert demo.startswith("pip install") and demo.endswith("python -m dim demo")
    assert tests.startswith("pip install tox") and tests.endswith("python -m tox -p")


def test_ci_runs_the_readmes_test_command() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    commands = [line.strip() for line in script.splitlines() if not line.lstrip().startswith("#")]
    assert readme_commands()[1] in commands


def test_the_testing_page_shows_the_same_test_command() -> None:
    page = (ROOT / "docs" / "testing.rst").read_text()
    assert re.search(r"\$ " + re.escape(readme_commands()[1]) + r"\s*$", page, re.MULTILINE)
