"""A TCP proxy in front of Redis that injects network faults (see :class:`ChaosProxy`)."""

from __future__ import annotations

import hashlib
import random
import socket
import threading
import time
from typing import Optional

from dim import scripts

__all__ = ["ChaosProxy"]


class ChaosProxy:
    """A TCP proxy in front of Redis that can delay, stall or drop traffic.

    * :meth:`set_latency` delays every chunk, both ways, by ``latency`` plus up to
      ``jitter`` seconds (slow Redis).
    * :meth:`stall` holds all traffic, new connections included, until :meth:`resume`:
      a partition without resets. Requests held meanwhile still reach Redis afterwards,
      even if their client gave up on them, as delayed TCP segments would.
    * :meth:`drop` closes every connection and refuses new ones until :meth:`undrop`.
    * :meth:`hold` holds back the requests carrying dim's HEARTBEAT script (``EVALSHA``)
      of one node until :meth:`release`; everything else flows.
    * :meth:`retarget` points the proxy at another server (a failover): every open
      connection is closed, new ones go to the new server.
    """

    SHA = hashlib.sha1(scripts.HEARTBEAT.encode()).hexdigest().encode()

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._needle: Optional[bytes] = None  # node id whose heartbeats are held
        self._gate = threading.Event()  # heartbeat hold
        self._gate.set()
        self._flow = threading.Event()  # cleared while stalled
        self._flow.set()
        self._closing = threading.Event()
        self._latency = 0.0
        self._jitter = 0.0
        self._dropping = False
        self._rng = random.Random()
        self.held = 0  # heartbeats held back now
        self.held_at: Optional[float] = None  # when the first of them arrived
        self.forwarded = 0  # held heartbeats forwarded since
        self.connections = 0  # accepted so far
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._accepter = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._accepter.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    # faults

    def hold(self, node_id: str) -> None:
        with self._lock:
            self._needle = node_id.encode()
            self.held_at = None
            self._gate.clear()

    def release(self) -> None:
        with self._lock:
            self._needle = None
            self._gate.set()

    def retarget(self, port: int, host: str = "127.0.0.1") -> None:
        """Send new connections to ``host:port``; close the open ones."""
        with self._lock:
            self.target = (host, port)
            pairs = list(self._pairs)
        for pair in pairs:
            self._shut(*pair)

    def set_latency(self, latency: float, jitter: float = 0.0) -> None:
        with self._lock:
            self._latency = max(0.0, latency)
            self._jitter = max(0.0, jitter)

    def stall(self) -> None:
        self._flow.clear()

    def resume(self) -> None:
        self._flow.set()

    def drop(self) -> None:
        with self._lock:
            self._dropping = True
            pairs = list(self._pairs)
        for pair in pairs:
            self._shut(*pair)

    def undrop(self) -> None:
        with self._lock:
            self._dropping = False

    def heal(self) -> None:
        """End every fault: no latency, no stall, no drop, no hold."""
        self.set_latency(0.0)
        self.undrop()
        self.release()
        self.resume()

    def close(self) -> None:
        self._closing.set()
        self.heal()
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            self._shut(*pair)

    # plumbing

    @staticmethod
    def _shut(*socks: socket.socket) -> None:
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                dropping = self._dropping
            if dropping:
                client.close()
                continue
            with self._lock:
                target = self.target
            try:
                server = socket.create_connection(target, timeout=5.0)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            pair = (client, server)
            with self._lock:
                moved = self.target != target  # re-pointed meanwhile: not this one
                if not moved:
                    self._pairs.add(pair)
                    self.connections += 1
            if moved:
                self._shut(client, server)
                client.close()
                server.close()
                continue
            done = [0]
            for src, dst, inspect in ((client, server, True), (server, client, False)):
                threading.Thread(
                    target=self._pump,
                    args=(src, dst, inspect, pair, done),
                    name="proxy-pump",
                    daemon=True,
                ).start()

    def _pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        inspect: bool,
        pair: tuple[socket.socket, socket.socket],
        done: list[int],
    ) -> None:
        tail = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if inspect:
                    seen, tail = tail + data, data[-200:]
                    with self._lock:
                        needle = self._needle
                        hold = needle is not None and self.SHA in seen and needle in seen
                        if hold:
                            self.held += 1
                            if self.held_at is None:
                                self.held_at = time.monotonic()
                    if hold:
                        self._gate.wait()
                        with self._lock:
                            self.held -= 1
                            self.forwarded += 1
                with self._lock:
                    delay = self._latency + self._jitter * self._rng.random()
                if delay > 0:
                    self._closing.wait(delay)
                while not self._flow.wait(0.1):
                    if self._closing.is_set():
                        return
                with self._lock:
                    if self._dropping:
                        break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._shut(src, dst)
            with self._lock:
                done[0] += 1
                if done[0] == 2:
                    self._pairs.discard(pair)
                    for sock in pair:
                        try:
                            sock.close()
                        except OSError:
                            pass
