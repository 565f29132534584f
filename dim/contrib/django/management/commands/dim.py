"""``manage.py dim ...``: the ``dim`` command on this project's ``settings.DIM``.

The arguments go unchanged to :func:`dim.cli.main` (``manage.py dim status --json``,
``manage.py dim drain web-3 --wait 60``, ``manage.py dim run``), and its exit code is the
process's. Django's own ``--settings`` and ``--pythonpath``, which ``manage.py`` applied
already, are taken out first.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, ClassVar

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError
from django.db import connections

from dim.contrib.django.process import admin, foreground

#: Django's options that manage.py applies before any command runs (name, takes a value).
_DJANGO_OPTIONS = ("--settings", "--pythonpath")


def _main(argv: list[str], prog: str) -> int:
    from dim.cli import main  # the command line, only when asked for

    return main(argv, prog=prog, admin=admin, manager=foreground)


def _without_django_options(argv: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _DJANGO_OPTIONS:
            skip = True
        elif not arg.startswith(tuple(f"{name}=" for name in _DJANGO_OPTIONS)):
            out.append(arg)
    return out


class Command(BaseCommand):  # type: ignore[misc]  # django ships no type hints
    help = "Look at, steer or run this project's dim cluster ('manage.py dim --help')."
    # `manage.py check` reports settings.DIM; `dim status` must work on a broken project
    requires_system_checks: ClassVar[list[str]] = []

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        # for call_command("dim", "status", "--json"): everything goes to dim's parser
        parser.add_argument("args", nargs=argparse.REMAINDER)

    def run_from_argv(self, argv: list[str]) -> None:
        # dim's own parser reads the arguments: Django's would take `--help` and `-v`
        program = os.path.basename(argv[0])
        if program == "__main__.py":  # as Django names it
            program = "python -m django"
        prog = f"{program} {argv[1]}"
        try:
            code = _main(_without_django_options(argv[2:]), prog)
        finally:
            try:
                connections.close_all()
            except ImproperlyConfigured:
                pass  # no database configured: nothing to close
        if code:
            sys.exit(code)

    def print_help(self, prog_name: str, subcommand: str) -> None:
        # `manage.py help dim`
        from dim.cli import build_parser

        build_parser(
            prog=f"{os.path.basename(prog_name)} {subcommand}", admin=admin, manager=foreground
        ).print_help(self.stdout)

    def handle(self, *args: Any, **options: Any) -> None:
        code = _main(list(args), "manage.py dim")
        if code:
            raise CommandError(f"dim {' '.join(args)} exited with {code}", returncode=code)
