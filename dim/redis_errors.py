"""One line for a person, saying what went wrong with Redis and what to do about it.

Shared by :meth:`dim.Manager.start` and the ``dim`` command, so both explain a refused
login, a missing ACL permission, a rejected TLS certificate or a TLS/plain mix-up in the
same words.
"""

from __future__ import annotations

import ssl
from typing import Optional

import redis


def causes(exc: BaseException) -> list[BaseException]:
    """The exception and what caused it (at most 10 deep)."""
    chain: list[BaseException] = []
    cause: Optional[BaseException] = exc
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    return chain


def refused_login(exc: BaseException) -> bool:
    """A wrong or missing password (redis-py makes it a ConnectionError subclass)."""
    refused = (
        redis.AuthenticationError,
        getattr(redis.exceptions, "AuthorizationError", redis.AuthenticationError),
    )
    detail = str(exc)
    return isinstance(exc, refused) or "NOAUTH" in detail or "WRONGPASS" in detail


def certificate_rejected(exc: BaseException) -> bool:
    return any(isinstance(e, ssl.SSLCertVerificationError) for e in causes(exc))


def explain(
    exc: redis.RedisError,
    where: str,
    *,
    has_password: bool,
    acl_hint: str,
    unreachable: str = "cannot reach Redis at {where}",
) -> str:
    """What went wrong with Redis at ``where`` (a URL without secrets), in one line.

    ``acl_hint`` says which ACL the caller needs; ``unreachable`` is the opening of the
    message for a server that did not answer.
    """
    detail = " ".join(str(exc).split()) or type(exc).__name__
    if refused_login(exc):
        if not has_password:
            return (
                f"Redis at {where} requires a password; give it in the URL: "
                "redis://[user]:PASSWORD@host:port/0"
            )
        return (
            f"Redis at {where} refused the login: {detail} (the user and password go in "
            "the URL: redis://[user]:PASSWORD@host:port/0)"
        )
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return (
            f"the Redis user of {where} lacks a permission dim needs (NOPERM {detail}); {acl_hint}"
        )
    chain = causes(exc)
    if certificate_rejected(exc):
        return (
            f"the TLS certificate of Redis at {where} was rejected ({detail}); ssl_ca_certs "
            "must name the CA that signed it, and it must be valid for the host in the URL"
        )
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        tls = where.startswith("rediss://")
        text = " ".join(str(e) for e in chain).lower()
        # the server hung up on us: a TLS/plain mismatch, or a client cert it wants
        cut_off = "closed by server" in text or any(
            isinstance(e, (ssl.SSLError, ConnectionResetError, BrokenPipeError)) for e in chain
        )
        if tls and ("handshake" in text or "wrong version number" in text):
            hint = " (no answer to the TLS handshake: without TLS, use redis://)"
        elif tls and cut_off:
            hint = (
                " (the server ended the TLS session: if it wants a client certificate, "
                "give ssl_certfile and ssl_keyfile)"
            )
        elif cut_off:
            hint = " (the server hung up: if it speaks TLS only, use rediss://)"
        else:
            hint = ""
        return f"{unreachable.format(where=where)}: {detail}{hint}"
    if isinstance(exc, redis.ResponseError):
        return f"Redis at {where} refused a command: {detail}"
    return f"Redis error at {where}: {detail}"
