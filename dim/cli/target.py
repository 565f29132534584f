"""Where a ``dim`` subcommand connects: the connection options, their environment
variables, and the Redis URL and service name they make together.

Every connection option may come before the subcommand (``dim --service feeds status``)
or after it (``dim status --service feeds``); the later one wins, and either wins over
the option's environment variable. The values are read when the command runs (not when
the parser is built), so a bad environment variable is reported like a bad argument:
one line naming the variable, exit code 2.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Callable, Optional

import attrs

from dim.errors import ConfigError
from dim.keys import check_service
from dim.urls import check_url, url_with

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
REDIS_URL_ENV = "DIM_REDIS_URL"
SERVICE_ENV = "DIM_SERVICE"


class TargetError(ConfigError):
    """A connection option (or its environment variable) that is not valid."""


def _redis_url(text: str) -> str:
    check_url(text)
    return text


def _service(text: str) -> str:
    return check_service(text)


def _file(text: str) -> str:
    if not os.path.isfile(text):
        raise ConfigError(f"no such file: {text!r}", text)
    return text


@attrs.frozen
class Option:
    """One connection option: its flag, its variable, and how its value is checked.

    :ivar check: returns the value, or raises :class:`~dim.errors.ConfigError` (whose
        message must not show a secret).
    """

    flag: str
    env: str
    metavar: str
    help: str
    check: Callable[[str], str] = str

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


#: The connection options, in the order of ``--help``.
OPTIONS = (
    Option(
        "--redis",
        REDIS_URL_ENV,
        "URL",
        "the Redis URL: redis[s]://, unix://, redis[s]+sentinel:// or redis[s]+cluster:// "
        f"(default {DEFAULT_REDIS_URL})",
        _redis_url,
    ),
    Option(
        "--service",
        SERVICE_ENV,
        "NAME",
        "the service name (required)",
        _service,
    ),
    Option("--username", "DIM_REDIS_USERNAME", "USER", "the ACL user (instead of the URL's)"),
    Option(
        "--password",
        "DIM_REDIS_PASSWORD",
        "PASSWORD",
        "the password (instead of the URL's); on the command line, other users may see it "
        "in ps: prefer the variable",
    ),
    Option(
        "--tls-ca",
        "DIM_REDIS_TLS_CA",
        "FILE",
        "the CA certificate(s) to trust, PEM (ssl_ca_certs; needs rediss://)",
        _file,
    ),
    Option(
        "--tls-cert",
        "DIM_REDIS_TLS_CERT",
        "FILE",
        "a client certificate, PEM (ssl_certfile)",
        _file,
    ),
    Option("--tls-key", "DIM_REDIS_TLS_KEY", "FILE", "its private key, PEM (ssl_keyfile)", _file),
    Option(
        "--sentinel-username",
        "DIM_SENTINEL_USERNAME",
        "USER",
        "the sentinels' own ACL user (redis+sentinel://)",
    ),
    Option(
        "--sentinel-password",
        "DIM_SENTINEL_PASSWORD",
        "PASSWORD",
        "the sentinels' own password (redis+sentinel://; prefer the variable)",
    ),
)

#: The options :func:`resolve_url` folds into the URL, by the name ``url_with`` gives
#: them.
URL_OPTIONS = {
    "--username": "username",
    "--password": "password",
    "--tls-ca": "tls_ca",
    "--tls-cert": "tls_cert",
    "--tls-key": "tls_key",
    "--sentinel-username": "sentinel_username",
    "--sentinel-password": "sentinel_password",
}


def add_options(
    parser: argparse.ArgumentParser,
    *,
    top: bool,
    service: bool = True,
    helps: Optional[Mapping[str, str]] = None,
) -> None:
    """Add the connection options to ``parser``.

    :param top: the top-level parser, which stores None for an option not given; a
        subcommand's parser stores nothing then, so that an option given before the
        subcommand survives.
    :param service: with ``--service`` (``dim demo`` makes its own service).
    :param helps: help texts that replace the usual ones, by flag.
    """
    group = parser.add_argument_group(
        "connection (before or after the subcommand; each defaults to its [$VARIABLE])"
    )
    for option in OPTIONS:
        if option.flag == "--service" and not service:
            continue
        text = (helps or {}).get(option.flag, option.help)
        group.add_argument(
            option.flag,
            dest=option.dest,
            metavar=option.metavar,
            type=_argument_type(option),
            default=None if top else argparse.SUPPRESS,
            help=f"{text} [${option.env}]",
        )


def _argument_type(option: Option) -> Callable[[str], str]:
    def parse(text: str) -> str:
        try:
            return option.check(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = option.dest  # argparse names the type in some errors
    return parse


def value(args: argparse.Namespace, option: Option) -> Optional[str]:
    """The option's value: from the command line, else from its environment variable
    (checked), else None.

    :raises TargetError: the environment variable is not valid (the message names it).
    """
    given: Optional[str] = getattr(args, option.dest, None)
    if given:
        return given
    text = os.environ.get(option.env) or None
    if text is None:
        return None
    try:
        return option.check(text)
    except ConfigError as exc:
        raise TargetError(f"${option.env}: {exc}", option.env) from None


def _option(flag: str) -> Option:
    return next(o for o in OPTIONS if o.flag == flag)


def resolve_url(args: argparse.Namespace, *, default: Optional[str] = DEFAULT_REDIS_URL) -> str:
    """The URL the command connects to, with every other connection option folded in
    (:func:`dim.urls.url_with`): a password from ``$DIM_REDIS_PASSWORD`` never shows on
    the command line, and messages print the URL without it.

    :raises TargetError: an environment variable is not valid, or the options do not
        go together.
    """
    url = value(args, _option("--redis")) or default
    if url is None:
        raise TargetError("--redis is required", None)
    given = {name: value(args, _option(flag)) for flag, name in URL_OPTIONS.items()}
    try:
        return url_with(url, **given)
    except ConfigError as exc:
        flags = ", ".join(f for f, name in URL_OPTIONS.items() if given[name] is not None)
        raise TargetError(f"{flags}: {exc}", None) from None


def resolve_service(args: argparse.Namespace) -> str:
    """The service name (from ``--service`` or ``$DIM_SERVICE``).

    :raises TargetError: neither is given, or the variable is not valid.
    """
    name = value(args, _option("--service"))
    if name is None:
        raise TargetError(f"--service is required (or set ${SERVICE_ENV})", None)
    return name
