"""Sphinx configuration for dim's documentation.

Build: ``python -m tox -e docs``, or ``sphinx-build -W --keep-going -b html docs
docs/_build/html`` with ``pip install -e '.[docs]'``. The build needs no network:
there is no intersphinx mapping to fetch, and the theme ships its assets.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from sphinx.ext.napoleon import Config as NapoleonConfig
from sphinx.ext.napoleon.docstring import GoogleDocstring

import dim

project = "dim"
author = "dim contributors"
copyright = "dim contributors"
version = release = dim.__version__

extensions = ["sphinx.ext.autodoc"]

root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []

# Autodoc: members in source order, signatures with their types, no private names.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"

# The Django and Flask integrations and dim.metrics import optional packages, which the
# docs tox environment installs. Mock those a reader builds without, rather than lose
# the pages.
autodoc_mock_imports = [
    name
    for name in ("flask", "django", "prometheus_client")
    if importlib.util.find_spec(name) is None
]

# furo if installed (the docs extra and tox env install it), else Sphinx's own theme.
html_theme = "furo" if importlib.util.find_spec("furo") is not None else "alabaster"
html_title = f"dim {release}"
html_static_path: list[str] = []

# Code blocks are Python unless they say otherwise.
highlight_language = "python3"


# dim.testing writes Google-style sections ("Args:", "Raises:"); the rest of dim writes
# reST field lists. Napoleon runs on dim.testing only: applied everywhere it would read
# a property docstring's "summary: more" first line as "type: description".
_napoleon_config = NapoleonConfig(napoleon_use_param=True, napoleon_use_rtype=True)


def _google_sections(
    app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    if name == "dim.testing" or name.startswith("dim.testing."):
        lines[:] = GoogleDocstring(lines, _napoleon_config, app, what, name, obj).lines()


def setup(app: Any) -> None:
    app.connect("autodoc-process-docstring", _google_sections)
