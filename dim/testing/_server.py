"""A private, throw-away Redis server process (:class:`RedisServer`)."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from dim.testing._support import (
    _FORBIDDEN_PORTS,
    Started,
    _pause,
    find_redis_server,
    free_port,
)
from dim.testing._tls import TLSFiles

_LOG_NAME = "redis-server.log"
_ADDRESS_IN_USE = "address already in use"


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


class RedisServer(Started):
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
