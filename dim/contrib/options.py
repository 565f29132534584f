"""The :class:`~dim.Manager`'s options as a framework's settings hold them.

Every keyword of ``Manager(...)`` is a setting, named by its upper-case name (``redis`` is
``REDIS_URL``): ``settings.DIM["NODE_NAME"]`` for Django, ``app.config["DIM_NODE_NAME"]``
for Flask. The list is read from the Manager's signature, so a new Manager option is a
new setting everywhere at once. Values are what the Manager takes, with two conveniences
for settings files: a callback (``GET_CONFIG``, ``CREATE``, ``HEALTHCHECK``,
``DISCONNECT``, ``KEY``) may be the dotted path of one (``pkg.module.attr`` or
``pkg.module:attr``), and ``SETTINGS`` may be a dict of :class:`~dim.Settings` fields.

:meth:`OptionReader.problems` checks without raising and reports every problem (the
Django system checks show them); :meth:`OptionReader.kwargs` returns the Manager's
keyword arguments or raises :class:`~dim.ConfigError` naming the first problem. Each
value is checked by the Manager's own validation (a Manager is built, never started),
so the settings accept exactly what ``Manager(...)`` accepts.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any, Callable, Optional

import attrs

from dim.contrib import settings_from
from dim.errors import ConfigError
from dim.manager import Manager

__all__ = [
    "CALLBACKS",
    "MANAGER_OPTIONS",
    "REQUIRED",
    "OptionReader",
    "Problem",
    "import_path",
    "setting_name",
]

#: Every parameter of :class:`dim.Manager`, in its signature's order.
MANAGER_OPTIONS: tuple[str, ...] = tuple(
    name for name in inspect.signature(Manager.__init__).parameters if name != "self"
)
#: The options that are callbacks: a setting may name one by its dotted path.
CALLBACKS = frozenset({"get_config", "create", "healthcheck", "disconnect", "key"})
#: The options a setting must give. (The Manager defaults ``redis`` to localhost; an
#: application's settings say where Redis is.)
REQUIRED = ("redis", "service", "get_config", "create")

#: Checks a setting of the integration itself (``AUTOSTART``): an error message, or None.
ExtraCheck = Callable[[Any], Optional[str]]


def setting_name(option: str) -> str:
    """The setting of one Manager option: ``node_name`` -> ``NODE_NAME``, ``redis`` ->
    ``REDIS_URL`` (it also takes a client, but it is a URL in most settings files)."""
    return "REDIS_URL" if option == "redis" else option.upper()


_OPTION_OF = {setting_name(option): option for option in MANAGER_OPTIONS}


def import_path(path: str) -> Any:
    """The object at ``pkg.module.attr`` or ``pkg.module:attr`` (dotted attributes too).

    :raises ImportError: the module does not import, or has no such attribute.
    """
    if ":" in path:
        module_name, _, attribute = path.partition(":")
    else:
        module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute:
        raise ImportError(f"{path!r} is not a dotted path (pkg.module.attr or pkg.module:attr)")
    found: Any = importlib.import_module(module_name)
    for name in attribute.split("."):
        try:
            found = getattr(found, name)
        except AttributeError:
            raise ImportError(f"module {module_name!r} has no attribute {attribute!r}") from None
    return found


@attrs.frozen
class Problem:
    """One thing wrong with the settings.

    :ivar kind: ``type`` (the settings are not a mapping), ``unknown`` (a key no option
        has), ``missing`` (a required key), ``import`` (a dotted path that does not
        import), ``settings`` (bad :class:`~dim.Settings` fields) or ``invalid`` (a value
        the Manager refuses).
    :ivar key: the setting's key, without prefix; None for the whole mapping.
    :ivar message: says what is wrong, naming the setting as the user wrote it.
    """

    kind: str
    key: Optional[str]
    message: str


def _probe_get_config() -> list[Any]:
    return []


def _probe_create(config: Any) -> Any:
    return config


@attrs.frozen
class OptionReader:
    """Reads the Manager's options from one framework's settings.

    :ivar container: how the settings are named in messages (``settings.DIM``,
        ``app.config``).
    :ivar prefix: of each key in the container (``DIM_`` in Flask's ``app.config``); the
        values passed to the methods are keyed without it.
    :ivar extra: the integration's own settings (``AUTOSTART``) and their checks.
    :ivar missing_hint: ends the message of a missing required setting; ``{option}`` is
        the Manager's name for it.

    Example::

        reader = OptionReader("settings.DIM", extra={"AUTOSTART": check_autostart})
        manager = Manager(**reader.kwargs(settings.DIM))
    """

    container: str
    prefix: str = ""
    extra: Mapping[str, ExtraCheck] = attrs.field(factory=dict)
    missing_hint: str = ""

    @property
    def known(self) -> list[str]:
        """Every key the container may hold, prefix included, sorted."""
        return sorted(self.prefix + key for key in [*_OPTION_OF, *self.extra])

    def name(self, key: str) -> str:
        """One setting as the user writes it: ``settings.DIM['CREATE']``."""
        return f"{self.container}[{self.prefix + key!r}]"

    def problems(self, values: object) -> list[Problem]:
        """Everything wrong with ``values`` (keys without prefix); empty when all is well."""
        if not isinstance(values, Mapping):
            what = self.container if not self.prefix else f"the {self.prefix}* settings"
            return [Problem("type", None, f"{what} must be a dict, got {values!r}")]
        found: list[Problem] = []
        for key in sorted(map(str, values)):
            if key not in _OPTION_OF and key not in self.extra:
                found.append(
                    Problem(
                        "unknown",
                        key,
                        f"{self.container} has unknown key {self.prefix + key!r}; "
                        f"known: {self.known}",
                    )
                )
        for option in REQUIRED:
            key = setting_name(option)
            value = values.get(key)
            if value is None or value == "":
                hint = self.missing_hint.format(option=option)
                found.append(Problem("missing", key, f"{self.name(key)} is required{hint}"))
        for key, value in values.items():
            if key in self.extra:
                error = self.extra[key](value)
                if error is not None:
                    found.append(Problem("invalid", key, f"{self.name(key)} {error}"))
            elif key in _OPTION_OF and value is not None:
                problem = self._check(key, value)
                if problem is not None:
                    found.append(problem)
        return found

    def kwargs(self, values: object) -> dict[str, Any]:
        """The Manager's keyword arguments from ``values`` (keys without prefix).

        :raises ConfigError: the first of :meth:`problems`, if any.
        """
        found = self.problems(values)
        if found:
            raise ConfigError(found[0].message, values if found[0].key is None else found[0].key)
        assert isinstance(values, Mapping)
        out: dict[str, Any] = {}
        for key, value in values.items():
            option = _OPTION_OF.get(key)
            if option is not None and value is not None:
                out[option] = self._convert(key, option, value)
        return out

    # -- one value ------------------------------------------------------------------------

    def _convert(self, key: str, option: str, value: Any) -> Any:
        """The Manager's argument for one setting (a resolved path, a Settings)."""
        if option in CALLBACKS:
            return self._callback(key, value)
        if option == "settings":
            return settings_from(value, self.name(key))
        return value

    def _callback(self, key: str, value: Any) -> Any:
        if callable(value):
            return value
        if not isinstance(value, str):
            raise ConfigError(
                f"{self.name(key)} must be a dotted path or a callable, got {value!r}", value
            )
        found = import_path(value)  # ImportError: the caller says it is an import problem
        if not callable(found):
            raise ConfigError(f"{self.name(key)} = {value!r} is not callable", value)
        return found

    def _check(self, key: str, value: Any) -> Optional[Problem]:
        option = _OPTION_OF[key]
        try:
            converted = self._convert(key, option, value)
        except ImportError as exc:
            return Problem("import", key, f"{self.name(key)} = {value!r}: {exc}")
        except Exception as exc:
            message = _message(exc)
            if not message.startswith(self.name(key)):
                message = f"{self.name(key)}: {message}"
            return Problem("settings" if option == "settings" else "invalid", key, message)
        if option in CALLBACKS or option == "settings":
            return None
        # the Manager's own validation, on a manager built and never started (no I/O)
        probe: dict[str, Any] = {"get_config": _probe_get_config, "create": _probe_create}
        probe.update(service="probe", redis="redis://localhost:6379/0")
        probe[option] = converted
        try:
            Manager(**probe)
        except Exception as exc:
            return Problem("invalid", key, f"{self.name(key)}: {_message(exc)}")
        return None


def _message(exc: Exception) -> str:
    text = str(exc)
    return text if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {text}"
