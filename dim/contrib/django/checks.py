"""Django system checks of ``settings.DIM`` (``manage.py check``).

Each problem :meth:`dim.contrib.options.OptionReader.problems` finds is one message,
whose id says its kind:

``dim.E001``
    ``settings.DIM`` is missing or not a dict.
``dim.E002``
    An unknown key (the message lists the known ones).
``dim.E003``
    A required key is missing (``REDIS_URL``, ``SERVICE``, ``GET_CONFIG``, ``CREATE``).
``dim.E004``
    A dotted path that does not import.
``dim.E005``
    ``SETTINGS`` holds an unknown :class:`~dim.Settings` field or an invalid value.
``dim.E006``
    A value the :class:`~dim.Manager` refuses (a wrong type, a negative capacity...).

They are errors, so ``manage.py check`` exits 1 and ``runserver`` does not serve, except
under the migration commands (``migrate``, ``makemigrations``, ``showmigrations``,
``sqlmigrate``): dim has nothing to do with the database, so there the same problems
are warnings (``dim.W00N``) and the migrations still run. (The command is read from
``sys.argv``: Django 6 passes the databases to every check, so they cannot tell.)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, Optional

from django.conf import settings as django_settings
from django.core import checks

from dim.contrib.django.process import READER

__all__ = ["KINDS", "check_settings"]

#: The number of each kind of problem in its check id.
KINDS = {"type": 1, "unknown": 2, "missing": 3, "import": 4, "settings": 5, "invalid": 6}


def check_settings(
    app_configs: Optional[Sequence[Any]] = None,
    databases: Optional[Sequence[str]] = None,
    **kwargs: Any,
) -> list[checks.CheckMessage]:
    """The problems of ``settings.DIM``, as errors (warnings for a database command)."""
    if app_configs is not None and not any(c.label == "dim" for c in app_configs):
        return []  # `check otherapp`: not asked about dim
    problems = READER.problems(getattr(django_settings, "DIM", None))
    if _migrating():
        hint = "manage.py check reports it as an error; dim's manager cannot start until fixed"
        return [
            checks.Warning(p.message, hint=hint, obj="settings.DIM", id=f"dim.W{KINDS[p.kind]:03d}")
            for p in problems
        ]
    return [
        checks.Error(p.message, obj="settings.DIM", id=f"dim.E{KINDS[p.kind]:03d}")
        for p in problems
    ]


#: manage.py commands under which dim's problems are warnings (see the module doc)
MIGRATION_COMMANDS = frozenset({"migrate", "makemigrations", "showmigrations", "sqlmigrate"})


def _migrating() -> bool:
    return len(sys.argv) > 1 and sys.argv[1] in MIGRATION_COMMANDS
