"""``dim run package.module:factory``: a dedicated worker process, run for real.

The node programs are small modules written to the test's directory (the command puts
the current directory on ``sys.path``, as gunicorn and celery do); each create and
disconnect appends ``<event> <pid> <config id>`` to a ledger file, so the tests see
that a SIGTERM disconnects every instance before the process exits 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dim import Manager
from dim.admin import Admin
from dim.status import ClusterStatus
from dim.testing import free_port, wait_until

from .helpers import FAST, assert_one_line_error, dim_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

DEADLINE = 40.0  # for conditions that take a second or two when all is well

NODES = """
import os
import threading

from dim import Manager, Settings

SETTINGS = Settings(
    heartbeat_interval=0.2,
    node_ttl=2.0,
    leader_ttl=2.0,
    config_interval=0.5,
    create_timeout=2.0,
    disconnect_timeout=2.0,
    connect_timeout=float(os.environ.get("NODES_CONNECT_TIMEOUT", "5")),
)


def record(event, config):
    with open(os.environ["NODES_LEDGER"], "a", encoding="utf-8") as ledger:
        ledger.write(f"{event} {os.getpid()} {config}\\n")


def create(config):
    record("create", config)
    return config


def disconnect(config):
    record("disconnect", config)


def make():
    return Manager(
        lambda: ["a", "b", "c"],
        create,
        disconnect=disconnect,
        redis=os.environ["NODES_REDIS"],
        service=os.environ["NODES_SERVICE"],
        settings=SETTINGS,
    )


def stuck_disconnect(config):
    # blocks (up to 60 s) until the test creates the release file
    record("disconnecting", config)
    release = threading.Event()
    while not os.path.exists(os.environ["NODES_LEDGER"] + ".release"):
        release.wait(0.05)


def make_stuck():
    return Manager(
        lambda: ["a"],
        create,
        disconnect=stuck_disconnect,
        redis=os.environ["NODES_REDIS"],
        service=os.environ["NODES_SERVICE"],
        settings=Settings(heartbeat_interval=0.2, node_ttl=2.0, leader_ttl=2.0,
                          disconnect_timeout=60.0),
    )


def make_slowly():
    # a slow import or factory: waits (up to 60 s) for the test's file
    record("making", "-")
    wait = threading.Event()
    while not os.path.exists(os.environ["NODES_LEDGER"] + ".release"):
        wait.wait(0.05)
    return make()


def make_slow_exit():
    # the process then exits slowly: an exit hook waits (up to 60 s) for the test's file
    import atexit

    def exiting():
        record("exiting", "-")
        wait = threading.Event()
        while not os.path.exists(os.environ["NODES_LEDGER"] + ".release"):
            wait.wait(0.05)

    atexit.register(exiting)
    return make()


class SlowFinalizing:
    # its __del__ runs as the interpreter finalizes, after Python has reset the signal
    # handlers it installed; it waits (up to 60 s) for the test's file
    def __init__(self):
        self.base = os.environ["NODES_LEDGER"]
        self.calls = (os.open, os.close, os.path.exists, os.O_CREAT | os.O_WRONLY)
        self.wait = threading.Event().wait

    def __del__(self):
        open_, close, exists, flags = self.calls
        close(open_(self.base + ".finalizing", flags))
        for _ in range(1200):
            if exists(self.base + ".release"):
                break
            self.wait(0.05)


def make_slow_finalizing():
    global finalizing
    finalizing = SlowFinalizing()
    return make()


manager = make()  # a Manager itself is a target too
not_a_manager = 42


def returns_nothing():
    return None


def raises():
    raise RuntimeError("the factory broke")
"""


class Worker:
    """One ``python -m dim run TARGET`` process, its stderr in a file."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, *args],
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Any]:
    """Start worker processes for one test; any still running is killed after it."""
    started: list[Worker] = []

    def start(args: list[str], cwd: Path, env: dict[str, str]) -> Worker:
        worker = Worker(args, cwd, env, tmp_path / f"worker-{len(started)}.log")
        started.append(worker)
        return worker

    try:
        yield start
    finally:
        for worker in started:
            worker.close()


def ledger_lines(path: Path) -> list[tuple[str, int, str]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1].isdigit():
            out.append((parts[0], int(parts[1]), parts[2]))
    return out


def still_open(path: Path) -> list[str]:
    """Configs created and not disconnected, per the ledger."""
    count: dict[str, int] = {}
    for event, _, config in ledger_lines(path):
        count[config] = count.get(config, 0) + (1 if event == "create" else -1)
    return sorted(c for c, n in count.items() if n > 0)


def status(redis_url: str, service: str) -> ClusterStatus:
    with Admin(redis_url, service) as admin:
        return admin.status()


def wait_running(worker: Worker, redis_url: str, service: str, configs: int) -> str:
    """Wait until the worker's node runs ``configs`` instances; its node id."""

    def running() -> str:
        if worker.proc.poll() is not None:
            raise AssertionError(f"exited with {worker.proc.returncode}: {worker.stderr()}")
        for node in status(redis_url, service).nodes:
            if node.pid == worker.proc.pid and node.running == configs:
                return node.node_id
        return ""

    try:
        return wait_until(running, DEADLINE, interval=0.1)
    except TimeoutError:
        raise AssertionError(
            f"the worker never ran {configs} configs: {status(redis_url, service)}\n"
            f"{worker.stderr()}"
        ) from None


def stop(worker: Worker, signum: int) -> int:
    worker.proc.send_signal(signum)
    return worker.proc.wait(timeout=DEADLINE)


@pytest.fixture
def nodes(tmp_path: Path, redis_url: str, service: str) -> tuple[Path, dict[str, str]]:
    """The directory holding ``nodes.py``, and the environment its targets read."""
    (tmp_path / "nodes.py").write_text(NODES, encoding="utf-8")
    env = dim_env(
        NODES_REDIS=redis_url, NODES_SERVICE=service, NODES_LEDGER=str(tmp_path / "ledger")
    )
    return tmp_path, env


@pytest.mark.parametrize(
    ("target", "signum"), [("nodes:make", signal.SIGTERM), ("nodes:manager", signal.SIGINT)]
)
def test_dim_run_runs_a_node_until_a_signal_then_leaves_and_exits_0(
    nodes: tuple[Path, dict[str, str]],
    workers: Any,
    redis_url: str,
    service: str,
    target: str,
    signum: int,
) -> None:
    """A factory or a Manager: the node runs every config, and leaves at once on a signal."""
    cwd, env = nodes
    worker = workers(["-m", "dim", "run", target], cwd, env)
    node_id = wait_running(worker, redis_url, service, 3)
    assert len(status(redis_url, service).nodes) == 1
    assert stop(worker, signum) == 0, worker.stderr()
    # left gracefully: no member, nothing left running (not waiting for a TTL)
    assert status(redis_url, service).nodes == []
    assert still_open(cwd / "ledger") == []
    assert {pid for _, pid, _ in ledger_lines(cwd / "ledger")} == {worker.proc.pid}
    # logs to stderr by default: its own lines and dim's
    err = worker.stderr()
    assert f"node {node_id} joined service {service!r}" in err
    assert f"node {node_id} left service {service!r}" in err
    assert "Traceback" not in err


def test_dim_run_second_signal_exits_at_once(
    nodes: tuple[Path, dict[str, str]], workers: Any, redis_url: str, service: str
) -> None:
    """A second SIGTERM while a disconnect hangs ends the process at once (128 + signal)."""
    cwd, env = nodes
    # history from an earlier node: the stuck node's leader then places its config without
    # waiting the start-up grace of a new service (one lease: over a minute here)
    with Manager(lambda: ["a"], str, redis=redis_url, service=service, settings=FAST) as m:
        wait_until(lambda: len(m.instances) == 1, DEADLINE)
    worker = workers(["-m", "dim", "run", "nodes:make_stuck"], cwd, env)
    wait_running(worker, redis_url, service, 1)
    worker.proc.send_signal(signal.SIGTERM)
    wait_until(
        lambda: any(e[0] == "disconnecting" for e in ledger_lines(cwd / "ledger")),
        DEADLINE,
        interval=0.05,
        message="the stop never reached the disconnect",
    )
    assert worker.proc.poll() is None  # still stopping: the disconnect hangs
    assert stop(worker, signal.SIGTERM) == 128 + signal.SIGTERM
    assert "SIGTERM again: exiting now" in worker.stderr()


def test_dim_run_two_kinds_of_signal_at_once_still_stop_gracefully(
    nodes: tuple[Path, dict[str, str]], workers: Any, redis_url: str, service: str
) -> None:
    """SIGINT and SIGTERM back to back (a wrapper forwarding Ctrl-C) are one request: the
    node still leaves gracefully and the command exits 0."""
    cwd, env = nodes
    worker = workers(["-m", "dim", "run", "nodes:make"], cwd, env)
    wait_running(worker, redis_url, service, 3)
    worker.proc.send_signal(signal.SIGINT)
    assert stop(worker, signal.SIGTERM) == 0, worker.stderr()
    assert status(redis_url, service).nodes == []
    assert still_open(cwd / "ledger") == []


def _exiting(cwd: Path) -> bool:
    return any(e[0] == "exiting" for e in ledger_lines(cwd / "ledger"))


def _finalizing(cwd: Path) -> bool:
    return (cwd / "ledger.finalizing").exists()


@pytest.mark.parametrize(
    ("target", "reached"),
    [("nodes:make_slow_exit", _exiting), ("nodes:make_slow_finalizing", _finalizing)],
    ids=["in-an-exit-hook", "as-the-interpreter-finalizes"],
)
def test_dim_run_ignores_the_other_signal_of_a_pair_that_comes_after_its_stop(
    nodes: tuple[Path, dict[str, str]],
    workers: Any,
    redis_url: str,
    service: str,
    target: str,
    reached: Callable[[Path], bool],
) -> None:
    """The SIGTERM of a forwarded pair may come after the graceful stop that its SIGINT
    began, while the process exits (in an exit hook, or even once the interpreter has
    reset the signal handlers Python installed, its last step): it is the same request
    still, and the command exits 0 (the default action would have killed it)."""
    cwd, env = nodes
    worker = workers(["-m", "dim", "run", target], cwd, env)
    wait_running(worker, redis_url, service, 3)
    worker.proc.send_signal(signal.SIGINT)
    wait_until(lambda: reached(cwd), DEADLINE, interval=0.05, message="the process never got there")
    worker.proc.send_signal(signal.SIGTERM)
    (cwd / "ledger.release").write_text("")
    assert worker.proc.wait(timeout=DEADLINE) == 0, worker.stderr()
    assert status(redis_url, service).nodes == []
    assert still_open(cwd / "ledger") == []


def test_dim_run_stopped_while_loading_never_joins(
    nodes: tuple[Path, dict[str, str]], workers: Any, redis_client: Any, service: str
) -> None:
    """A signal while the target loads: the node never joins (no rebalance for nothing)."""
    cwd, env = nodes
    worker = workers(["-m", "dim", "run", "nodes:make_slowly"], cwd, env)
    wait_until(
        lambda: any(e[0] == "making" for e in ledger_lines(cwd / "ledger")),
        DEADLINE,
        interval=0.05,
        message="the factory never ran",
    )
    worker.proc.send_signal(signal.SIGTERM)
    (cwd / "ledger.release").write_text("")
    assert worker.proc.wait(timeout=DEADLINE) == 0, worker.stderr()
    assert "before the node started: not joining" in worker.stderr()
    assert list(redis_client.scan_iter(match=f"*{service}*")) == []


@pytest.mark.parametrize(
    ("target", "says"),
    [
        ("nodes:nothing", "module 'nodes' has no attribute 'nothing'"),
        ("nowhere:make", "cannot import module 'nowhere'"),
        ("nodes:not_a_manager", "is not a dim.Manager nor a callable returning one"),
        ("nodes:returns_nothing", "returned None, not a dim.Manager"),
        ("nodes:raises", "RuntimeError: the factory broke"),
    ],
)
def test_dim_run_bad_target_exits_1_with_assert_one_line_error(
    nodes: tuple[Path, dict[str, str]], target: str, says: str
) -> None:
    """A target that does not import or give a Manager: exit 1, one line naming it."""
    cwd, env = nodes
    result = subprocess.run(
        [sys.executable, "-m", "dim", "run", target],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    line = assert_one_line_error(result, 1)
    assert line.startswith("dim run: "), line
    assert says in line


def test_dim_run_target_without_a_colon_is_a_bad_argument(
    nodes: tuple[Path, dict[str, str]],
) -> None:
    """``dim run nodes`` (no ``:attr``) is a usage error: exit 2."""
    cwd, env = nodes
    result = subprocess.run(
        [sys.executable, "-m", "dim", "run", "nodes"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert "package.module:attribute" in assert_one_line_error(result, 2)


def test_dim_run_unreachable_redis_exits_1_with_assert_one_line_error(
    nodes: tuple[Path, dict[str, str]],
) -> None:
    """Start fails (nothing listens at the URL): exit 1 and one line, no traceback."""
    cwd, env = nodes
    url = f"redis://127.0.0.1:{free_port()}/0"
    env.update(NODES_REDIS=url, NODES_CONNECT_TIMEOUT="0.5")
    result = subprocess.run(
        [sys.executable, "-m", "dim", "run", "nodes:make"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    line = assert_one_line_error(result, 1)
    assert line.startswith("dim run: ") and "cannot reach Redis" in line, line
    assert f"127.0.0.1:{url.split(':')[2].split('/')[0]}" in line
