"""dim's Django app: ``"dim.contrib.django"`` in ``INSTALLED_APPS`` finds :class:`DimConfig`
here (``"dim.contrib.django.DimConfig"`` names it directly)."""

from __future__ import annotations

from django.apps import AppConfig
from django.core import checks

from dim.contrib.django.checks import check_settings
from dim.contrib.django.process import setup

__all__ = ["DimConfig"]


class DimConfig(AppConfig):  # type: ignore[misc]  # django ships no type hints
    """Builds the manager from ``settings.DIM`` in ``ready()`` and starts it as
    ``AUTOSTART`` says (see :mod:`dim.contrib.django`); registers the system checks of
    ``settings.DIM``."""

    name = "dim.contrib.django"
    label = "dim"
    verbose_name = "dim"
    default = True

    def ready(self) -> None:
        checks.register(check_settings, "dim")
        setup()
