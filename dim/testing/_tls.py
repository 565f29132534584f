"""The PEM files that make a test server speak TLS only (:class:`TLSFiles`)."""

from __future__ import annotations

from typing import Any, Optional
from urllib.parse import urlencode

import attrs


@attrs.frozen
class TLSFiles:
    """The PEM files of a TLS-only :class:`RedisServer`.

    With these the server listens for TLS on its port and for nothing else
    (``--port 0 --tls-port PORT``); :attr:`RedisServer.url` becomes a ``rediss://`` URL
    that trusts :attr:`ca_file`, and :meth:`RedisServer.client` connects over TLS.

    Example, with certificates made by ``trustme``::

        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        ca.cert_pem.write_to_path("ca.pem")
        cert.cert_chain_pems[0].write_to_path("server.pem")
        cert.private_key_pem.write_to_path("server.key")
        with RedisServer(tls=TLSFiles("server.pem", "server.key", "ca.pem")) as server:
            server.client().ping()

    :ivar cert_file: the server's certificate (chain), PEM.
    :ivar key_file: the server's private key, PEM, unencrypted.
    :ivar ca_file: the CA certificate that clients trust for the server and that the
        server trusts for client certificates.
    :ivar client_cert_file: optional client certificate (signed by :attr:`ca_file`);
        when given, the server requires one from every client
        (``--tls-auth-clients yes``) and :attr:`RedisServer.url` and
        :meth:`RedisServer.client` present this one. Without it the server asks for none.
    :ivar client_key_file: the private key of :attr:`client_cert_file`.
    """

    cert_file: str = attrs.field(converter=str)
    key_file: str = attrs.field(converter=str)
    ca_file: str = attrs.field(converter=str)
    client_cert_file: Optional[str] = attrs.field(
        default=None, converter=attrs.converters.optional(str)
    )
    client_key_file: Optional[str] = attrs.field(
        default=None, converter=attrs.converters.optional(str)
    )

    def __attrs_post_init__(self) -> None:
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ValueError("client_cert_file and client_key_file go together")

    @property
    def requires_client_cert(self) -> bool:
        """Whether the server asks every client for a certificate."""
        return self.client_cert_file is not None

    def server_args(self, port: int) -> list[str]:
        """The ``redis-server`` arguments for TLS on ``port`` and no plain TCP."""
        return [
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--tls-cert-file",
            self.cert_file,
            "--tls-key-file",
            self.key_file,
            "--tls-ca-cert-file",
            self.ca_file,
            "--tls-auth-clients",
            "yes" if self.requires_client_cert else "no",
        ]

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments that make a ``redis.Redis`` connect over TLS to the server."""
        options: dict[str, Any] = {"ssl": True, "ssl_ca_certs": self.ca_file}
        if self.client_cert_file is not None:
            options["ssl_certfile"] = self.client_cert_file
            options["ssl_keyfile"] = self.client_key_file
        return options

    def url_query(self) -> str:
        """The same options as ``rediss://`` URL query parameters (redis-py names)."""
        params = {"ssl_ca_certs": self.ca_file}
        if self.client_cert_file is not None and self.client_key_file is not None:
            params["ssl_certfile"] = self.client_cert_file
            params["ssl_keyfile"] = self.client_key_file
        return urlencode(params, safe="/")
