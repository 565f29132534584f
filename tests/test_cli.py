"""The ``dim`` command run for real (``python -m dim`` in a subprocess) against real Redis.

``dim status`` on empty and live services, its failures (unreachable Redis, refused
login, bad arguments: one line, no traceback, exit 1 or 2), and ``dim demo`` end to end,
including that it leaves no process behind.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Callable, Optional

import psutil  # type: ignore[import-untyped]
import pytest

from dim import Manager
from dim.testing import RedisServer, free_port, wait_until

from .helpers import FAST, ROOT, assert_one_line_error, dim_env, run_dim

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


@pytest.fixture
def two_managers(redis_url: str, service: str) -> Iterator[list[Manager]]:
    managers = [
        Manager(
            get_config=lambda: list(range(5)),
            create=lambda config: object(),
            redis=redis_url,
            service=service,
            settings=FAST,
        )
        for _ in range(2)
    ]
    for manager in managers:
        manager.start()
    try:
        wait_until(
            lambda: (
                all(m.wait_until_stable(0) for m in managers)
                and sorted(len(m.instances) for m in managers) == [2, 3]
            ),
            15,
            interval=0.02,
            message="the two managers did not settle",
        )
        yield managers
    finally:
        for manager in managers:
            manager.stop()


# -- dim status ---------------------------------------------------------------------------


def test_status_empty_service(redis_url: str, service: str) -> None:
    """status of a service nobody joined says there are no nodes and exits 0."""
    result = run_dim("status", "--redis", redis_url, "--service", service)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert f"service {service}" in result.stdout
    assert "no live nodes" in result.stdout
    assert "leader none" in result.stdout


def test_status_reads_url_and_service_from_environment(redis_url: str, service: str) -> None:
    """DIM_REDIS_URL and DIM_SERVICE stand in for --redis and --service."""
    result = run_dim("status", env=dim_env(DIM_REDIS_URL=redis_url, DIM_SERVICE=service))
    assert result.returncode == 0, result.stderr
    assert f"service {service}" in result.stdout


def test_status_shows_nodes_and_leader(
    redis_url: str, service: str, two_managers: list[Manager]
) -> None:
    """status of a live cluster lists both nodes, marks the leader and counts instances."""
    ids = [m.node_id for m in two_managers]
    leader = next(m.node_id for m in two_managers if m.is_leader)
    result = run_dim("status", "--redis", redis_url, "--service", service)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for node_id in ids:
        assert node_id is not None and node_id in out
    assert f"leader {leader}" in out
    assert re.search(rf"^\*\s+{re.escape(str(leader))}\s", out, re.MULTILINE), out
    assert "5 published, 5 running, 0 not running anywhere, 0 pending handoffs" in out


def test_status_json(redis_url: str, service: str, two_managers: list[Manager]) -> None:
    """status --json is ClusterStatus.to_dict(): both nodes, the leader, right counts."""
    result = run_dim("status", "--redis", redis_url, "--service", service, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["service"] == service
    assert sorted(n["node_id"] for n in data["nodes"]) == sorted(
        str(m.node_id) for m in two_managers
    )
    assert data["leader"] in {m.node_id for m in two_managers}
    assert sorted(n["running"] for n in data["nodes"]) == [2, 3]
    assert sorted(n["assigned"] for n in data["nodes"]) == [2, 3]
    assert sorted(c["config_id"] for c in data["configs"]) == [0, 1, 2, 3, 4]
    assert data["not_running"] == [] and data["pending"] == []


def test_deploy_checks_exit_codes(
    redis_url: str, service: str, two_managers: list[Manager]
) -> None:
    """As a process: wait --settled exits 0 on a settled cluster, status --check exits 1
    with one line per problem (here: too few nodes), options before the subcommand."""
    result = run_dim("--redis", redis_url, "--service", service, "wait", "--settled")
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert result.stdout.startswith(f"service {service} is settled: 5 configs running on 2")
    result = run_dim(
        "--redis", redis_url, "--service", service, "status", "--check", "--min-nodes", "3"
    )
    assert result.returncode == 1
    assert result.stderr == "dim status: not settled: 2 live nodes, expected at least 3\n"
    empty = dim_env(DIM_REDIS_URL=redis_url, DIM_SERVICE=f"{service}-empty")
    result = run_dim("status", "--check", env=empty)
    assert result.returncode == 1
    assert result.stderr == "dim status: not settled: no live nodes\n"


def test_status_unreachable_redis() -> None:
    """status against a port with nothing listening: exit 1, one clear line, no traceback."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    result = run_dim("status", "--redis", url, "--service", "x")
    line = assert_one_line_error(result, 1)
    assert "cannot reach Redis" in line and url in line


def test_status_wrong_password(redis_factory: Callable[..., RedisServer]) -> None:
    """A wrong or missing password: exit 1, a message naming the login, no secret shown."""
    server = redis_factory(password="pw")
    wrong = f"redis://:not-the-password@127.0.0.1:{server.port}/0"
    line = assert_one_line_error(run_dim("status", "--redis", wrong, "--service", "x"), 1)
    assert "refused the login" in line
    assert "not-the-password" not in line
    missing = f"redis://127.0.0.1:{server.port}/0"
    line = assert_one_line_error(run_dim("status", "--redis", missing, "--service", "x"), 1)
    assert "requires a password" in line


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["status"],  # no --service and no DIM_SERVICE
        ["status", "--service", "no spaces allowed"],
        ["status", "--service", "x", "--redis", "http://localhost:6379"],
        ["status", "--service", "x", "--redis", "redis://localhost:99999/0"],
        ["demo", "--nodes", "0"],
        ["demo", "--seconds", "soon"],
    ],
)
def test_bad_arguments(args: list[str]) -> None:
    """Bad arguments exit 2 with one line on stderr and no traceback."""
    line = assert_one_line_error(run_dim(*args), 2)
    assert "error:" in line


# -- dim demo -----------------------------------------------------------------------------


class DemoRun:
    """``python -m dim demo`` in a subprocess: its output, and every process it started."""

    def __init__(self, args: Sequence[str], env: Optional[dict[str, str]] = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dim", "demo", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env if env is not None else dim_env(),
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self.children: dict[int, Any] = {}  # pid -> psutil.Process (pins its create time)
        self.names: dict[int, str] = {}
        self._readers = [
            threading.Thread(target=self._read, args=(self.process.stdout, self.out)),
            threading.Thread(target=self._read, args=(self.process.stderr, self.err)),
            threading.Thread(target=self._watch),
        ]
        for thread in self._readers:
            thread.daemon = True
            thread.start()

    def _read(self, stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    def _watch(self) -> None:
        """Record the demo's descendants (nodes and redis-server) while it runs."""
        try:
            parent = psutil.Process(self.process.pid)
        except psutil.NoSuchProcess:
            return
        while self.process.poll() is None:
            try:
                children = parent.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for child in children:
                if child.pid not in self.children:
                    self.children[child.pid] = child
                    try:
                        self.names[child.pid] = " ".join(child.cmdline())
                    except psutil.Error:
                        self.names[child.pid] = "?"
            threading.Event().wait(0.05)

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def wait(self, timeout: float) -> int:
        code = self.process.wait(timeout)
        for thread in self._readers:
            thread.join(5)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for child in self.children.values():
            try:
                child.kill()
            except psutil.Error:
                pass

    def left_behind(self) -> list[str]:
        """Started processes still running (psutil checks pid and create time)."""
        alive = []
        for child in self.children.values():
            try:
                if child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
                    alive.append(self.names[child.pid])
            except psutil.NoSuchProcess:
                pass
        return alive

    def redis_port(self) -> int:
        match = re.search(r"private Redis on 127\.0\.0\.1:(\d+)", self.stdout)
        assert match, self.stdout
        return int(match.group(1))


def port_closed(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_demo_runs_its_script_and_cleans_up() -> None:
    """The scripted demo (stdin closed) settles after each step, exits 0, leaves nothing
    behind; the connection variables of the shell (a login for another Redis) do not
    reach its private Redis."""
    shell = dim_env(DIM_REDIS_USERNAME="someone", DIM_REDIS_PASSWORD="elsewhere")
    demo = DemoRun(["--nodes", "2", "--configs", "4", "--seconds", "25"], env=shell)
    try:
        code = demo.wait(60)
        out = demo.stdout
        assert code == 0, (out[-3000:], demo.stderr)
        assert "Traceback" not in demo.stderr
        for caption in (
            r">>> start 2 node processes",
            r">>> step 1/3: add node n3",
            r">>> step 2/3: stop n\d \(pid \d+, the leader\) gracefully",
            r">>> step 3/3: kill n\d \(pid \d+, the leader\) with SIGKILL",
        ):
            assert re.search(caption, out), (caption, out[-3000:])
        assert out.count("=== settled in") == 4, out[-3000:]  # the start and three steps
        assert "NAME  NODE" in out and "EXPIRES IN" in out
        assert "4 configs each running once on 1 node(s)" in out  # 2 + 1 - 1 - 1
        assert "scenario complete" in out and out.rstrip().endswith("done")
        # (which children existed is sampled by polling and may miss a short-lived one,
        # so only what is left at the end is checked)
        assert demo.left_behind() == []
        assert port_closed(demo.redis_port())
    finally:
        demo.kill()


def test_demo_sigterm_cleans_up() -> None:
    """SIGTERM during the demo stops its nodes and its Redis, then exits 143."""
    demo = DemoRun(["--nodes", "2", "--configs", "4", "--seconds", "60"])
    try:
        wait_until(lambda: "=== settled in" in demo.stdout, 30, interval=0.05)
        wait_until(lambda: len(demo.children) >= 3, 5, interval=0.05)
        demo.process.send_signal(signal.SIGTERM)
        code = demo.wait(30)
        assert code == 128 + signal.SIGTERM, (demo.stdout[-2000:], demo.stderr)
        assert "SIGTERM: cleaning up" in demo.stdout
        assert "Traceback" not in demo.stderr
        assert demo.left_behind() == []
        assert port_closed(demo.redis_port())
    finally:
        demo.kill()


def test_demo_without_a_redis_binary() -> None:
    """With no server binary, the demo says how to get one in one line and exits 1."""
    result = run_dim("demo", env=dim_env(DIM_REDIS_SERVER="/nonexistent/redis-server"))
    line = assert_one_line_error(result, 1)
    assert "pip install" in line and "--redis" in line
