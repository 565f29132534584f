"""Flask, Django and gunicorn integrations, and leaving the cluster at exit.

The gunicorn tests serve the examples under ``examples/`` with real gunicorn processes
(``sys.executable -m gunicorn``) against the session Redis; the instances append
``<event> <pid> <config id> <token>`` lines to a ledger file, so the tests see every
create and disconnect in every process.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import psutil
import pytest
import redis
from flask import Flask, jsonify

import dim.contrib
from dim import ConfigError, Manager
from dim.contrib.flask import Dim
from dim.keys import Keys
from dim.status import ClusterStatus, read_status
from dim.store import Store
from dim.testing import free_port, wait_until
from tests.helpers import FAST

ROOT = Path(__file__).resolve().parent.parent
FLASK_APP = ROOT / "examples" / "flask_app"
DJANGO_APP = ROOT / "examples" / "django_app"

# Roomy enough that a loaded machine does not make workers fence themselves. A new
# service waits its reset window before placing configs, and a SIGKILLed worker's claims
# expire after its lease: create_timeout and disconnect_timeout make these 4.7 s and 4 s
# (with their defaults, 10 s and 5 s, they would be 15.7 s and 7 s).
TIMINGS = {
    "heartbeat_interval": 0.2,
    "node_ttl": 2.0,
    "leader_ttl": 2.0,
    "config_interval": 0.5,
    "create_timeout": 2.0,
    "disconnect_timeout": 2.0,
    "connect_timeout": 5.0,
}
DEADLINE = 40.0  # for conditions that take seconds when all is well


# -- helpers ------------------------------------------------------------------------------


def _env(tmp_path: Path, **values: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["XDG_RUNTIME_DIR"] = str(tmp_path)  # gunicorn's control socket: one per test
    env.pop("SERVER_SOFTWARE", None)
    env.update(values)
    return env


def _ledger(path: Path) -> list[tuple[str, int, str, int]]:
    """``(event, pid, config id, token)`` per line; a torn last line is left for later."""
    if not path.exists():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[1].isdigit():
            entries.append((parts[0], int(parts[1]), parts[2], int(parts[3])))
    return entries


def _alive_in_ledger(path: Path, dead: Collection[int] = ()) -> dict[str, list[int]]:
    """config id -> pids running it now (created, not disconnected, process not dead)."""
    live: Counter[tuple[int, str, int]] = Counter()
    for event, pid, config_id, token in _ledger(path):
        if event in ("create", "disconnect"):
            live[(pid, config_id, token)] += 1 if event == "create" else -1
    out: dict[str, list[int]] = {}
    for (pid, config_id, _), count in live.items():
        if count > 0 and pid not in dead:
            out.setdefault(config_id, []).append(pid)
    return out


def _unclosed(path: Path, dead: Collection[int] = ()) -> list[tuple[int, str]]:
    """``(pid, config id)`` of instances never disconnected, outside killed processes."""
    alive = _alive_in_ledger(path, dead)
    return sorted((pid, config_id) for config_id, pids in alive.items() for pid in pids)


def _status(client: redis.Redis, service: str) -> ClusterStatus:
    return read_status(Store(client, service))


def _leftovers(client: redis.Redis, service: str) -> list[str]:
    """Keys that must be gone once every node left: members, claims, node info, leader."""
    keys = Keys(service)
    found = [k.decode() for k in client.scan_iter(match=keys.prefix + "*", count=1000)]
    gone_kinds = ("nodes", "leader", "claim:", "node:")
    return sorted(k for k in found if k[len(keys.prefix) :].startswith(gone_kinds))


def _settled_on(status: ClusterStatus, pids: set[int], configs: int) -> bool:
    """Every config claimed where it is assigned, by exactly the nodes of ``pids``."""
    node_pids = {n.node_id: n.pid for n in status.nodes}
    if set(node_pids.values()) != pids or len(status.configs) != configs:
        return False
    if status.pending or any(c.claimed_by not in node_pids for c in status.configs.values()):
        return False
    counts = [n.running for n in status.nodes]
    return max(counts) - min(counts) <= 1


def _runs_exactly_once(status: ClusterStatus, ledger: Path, dead: Collection[int]) -> bool:
    """The ledger shows each config alive in one process: the one holding its claim."""
    alive = _alive_in_ledger(ledger, dead)
    node_pids = {n.node_id: n.pid for n in status.nodes}
    return set(alive) == {str(c) for c in status.configs} and all(
        alive[str(c.config_id)] == [node_pids[c.claimed_by]] for c in status.configs.values()
    )


def _wait_for(predicate: Callable[[], Any], what: str, state: Callable[[], Any]) -> None:
    """Wait up to DEADLINE; on timeout, fail saying what was awaited and how things are."""
    try:
        wait_until(predicate, DEADLINE, interval=0.05)
    except TimeoutError:
        raise AssertionError(f"{what} within {DEADLINE:g} s; now: {state()}") from None


class Gunicorn:
    """A real gunicorn master (in its own session) serving one app on a free port."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{self.port}", *args],
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def get(self, path: str) -> tuple[int, str]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read().decode()
        finally:
            connection.close()

    def _answers(self, path: str) -> Optional[tuple[int, str]]:
        if self.proc.poll() is not None:
            raise AssertionError(f"gunicorn exited with {self.proc.returncode}:\n{self.output()}")
        try:
            return self.get(path)
        except OSError:
            return None

    def wait_answering(self, path: str) -> tuple[int, str]:
        return wait_until(
            lambda: self._answers(path), DEADLINE, interval=0.1, message="gunicorn never answered"
        )

    def workers(self) -> set[int]:
        return {child.pid for child in psutil.Process(self.proc.pid).children()}

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=DEADLINE)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def run_gunicorn(tmp_path: Path) -> Iterator[Any]:
    """Start gunicorn masters for one test; each is stopped (SIGTERM, then SIGKILL) after."""
    started: list[Gunicorn] = []

    def run(args: list[str], cwd: Path, env: dict[str, str]) -> Gunicorn:
        server = Gunicorn(args, cwd, env, tmp_path / f"gunicorn-{len(started)}.log")
        started.append(server)
        return server

    try:
        yield run
    finally:
        for server in started:
            server.close()


# -- Flask, in this process ---------------------------------------------------------------


def _flask_app(ext: Dim, redis_url: str, service: str, **config: Any) -> Flask:
    app = Flask(f"app-{service}")
    app.config.update({"DIM_REDIS_URL": redis_url, "DIM_SERVICE": service, "DIM_SETTINGS": FAST})
    app.config.update(config)
    ext.init_app(app)

    @app.get("/where")
    def where() -> Any:
        return jsonify(pid=os.getpid(), instances=sorted(ext.manager.instances))

    return app


def test_flask_extension_starts_one_manager_per_process(
    redis_url: str, redis_client: redis.Redis, service: str
) -> None:
    """init_app starts the manager once per process, shared by every app of a factory."""
    created: list[Any] = []
    ext = Dim(get_config=lambda: ["a", "b", "c"], create=lambda c: created.append(c) or c)
    apps = [_flask_app(ext, redis_url, service) for _ in range(2)]
    try:
        with apps[0].app_context():
            first = ext.manager
        with apps[1].app_context():
            assert ext.manager is first
        assert first.node_id is not None  # started by init_app
        wait_until(lambda: sorted(first.instances) == ["a", "b", "c"], DEADLINE)
        reply = apps[1].test_client().get("/where").get_json()
        assert reply == {"pid": os.getpid(), "instances": ["a", "b", "c"]}
        assert len(_status(redis_client, service).nodes) == 1
    finally:
        ext.stop()
    assert first.node_id is None
    assert sorted(created) == ["a", "b", "c"]
    assert _leftovers(redis_client, service) == []


def test_flask_extension_names_bad_configuration(redis_url: str, service: str) -> None:
    """A missing DIM_* key, an unknown setting or a missing callback fails init_app by name."""
    ext = Dim(get_config=list, create=str)
    with pytest.raises(ConfigError, match="DIM_SERVICE"):
        _flask_app(ext, redis_url, "")
    bad = {"DIM_SETTINGS": {"heartbeat": 1}}
    with pytest.raises(ConfigError, match="heartbeat"):
        _flask_app(ext, redis_url, service, **bad)
    with pytest.raises(ConfigError, match="create"):
        _flask_app(Dim(get_config=list), redis_url, service)


@pytest.mark.slow  # gunicorn processes: one interpreter is enough
def test_flask_defers_in_gunicorn_until_the_first_request(
    redis_url: str, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a gunicorn process not known to be a worker, init_app waits for a request."""
    import gunicorn.arbiter  # noqa: F401  (a gunicorn process has it loaded)

    monkeypatch.setenv("SERVER_SOFTWARE", "gunicorn/test")
    monkeypatch.setattr(dim.contrib._state, "worker", False)
    ext = Dim(get_config=lambda: ["a"], create=str)
    app = _flask_app(ext, redis_url, service)
    try:
        assert ext.manager.node_id is None  # what a master with --preload must do
        assert dim.contrib.in_prefork_parent()
        app.test_client().get("/where")
        assert ext.manager.node_id is not None
        assert not dim.contrib.in_prefork_parent()
    finally:
        ext.stop()


def test_flask_cli_commands_do_not_join_the_cluster(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, service: str
) -> None:
    """A `flask` command that serves nothing (here `flask routes`) never starts the manager."""
    env = _env(tmp_path, DIM_REDIS_URL=redis_url, DIM_SERVICE=service)
    result = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", "routes"],
        cwd=FLASK_APP,
        env=env,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert result.returncode == 0, result.stderr
    assert "/dim" in result.stdout
    assert list(redis_client.scan_iter(match=Keys(service).prefix + "*")) == []


# -- gunicorn with the Flask example --------------------------------------------------------


@pytest.mark.slow  # gunicorn processes: one interpreter is enough
def test_gunicorn_workers_share_configs_heal_and_stop_cleanly(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, service: str, run_gunicorn: Any
) -> None:
    """3 preloaded workers split the configs, a SIGKILLed worker's move, SIGTERM cleans up."""
    ledger = tmp_path / "ledger"
    configs = 9
    env = _env(
        tmp_path,
        DIM_REDIS_URL=redis_url,
        DIM_SERVICE=service,
        DIM_SETTINGS=json.dumps(TIMINGS),
        FEEDS=str(configs),
        FEEDS_LEDGER=str(ledger),
    )
    # the example's config: 3 workers, preload_app, the post_fork and worker_exit hooks
    server = run_gunicorn(["-c", "gunicorn.conf.py", "--workers", "3"], FLASK_APP, env)
    server.wait_answering("/dim")

    # (a) the configs spread over the 3 worker processes; the master runs none
    wait_until(lambda: len(server.workers()) == 3, DEADLINE, message="3 workers")
    workers = server.workers()
    _wait_for(
        lambda: (
            _settled_on(_status(redis_client, service), workers, configs)
            and _runs_exactly_once(_status(redis_client, service), ledger, ())
        ),
        f"configs spread over workers {sorted(workers)}",
        lambda: _alive_in_ledger(ledger),
    )
    status = _status(redis_client, service)
    assert sorted(n.running for n in status.nodes) == [3, 3, 3]
    assert server.proc.pid not in {n.pid for n in status.nodes}
    code, body = server.get("/dim")
    reply = json.loads(body)
    assert code == 200 and reply["pid"] in workers
    by_node = {str(c.config_id) for c in status.configs.values() if c.claimed_by == reply["node"]}
    assert set(reply["instances"]) == by_node

    # (c) a worker killed with SIGKILL: its configs run again, each exactly once, on the
    # survivors and the worker gunicorn spawns in its place
    victim = next(n for n in status.nodes if n.node_id != status.leader)
    assert victim.pid is not None
    os.kill(victim.pid, signal.SIGKILL)
    dead = {victim.pid}

    def healed() -> bool:
        now = server.workers()
        if len(now) != 3 or now & dead:
            return False
        status = _status(redis_client, service)
        return _settled_on(status, now, configs) and _runs_exactly_once(status, ledger, dead)

    _wait_for(healed, "every config running once again", lambda: _alive_in_ledger(ledger, dead))

    # (b) SIGTERM to the master: every worker disconnects every instance and leaves
    workers = server.workers()
    assert server.terminate() == 0, server.output()
    assert not any(psutil.pid_exists(pid) for pid in workers)
    assert _unclosed(ledger, dead) == []
    assert _leftovers(redis_client, service) == []
    assert _status(redis_client, service).nodes == []


_FORKED_APP = """
import os

from dim import ForkedError, Manager, Settings

# the mistake under test: a manager started at import, in gunicorn's master (--preload)
manager = Manager(
    get_config=lambda: [],  # no instances: this test is about the fork, not about them
    create=lambda config: config,
    redis=os.environ["DIM_REDIS_URL"],
    service=os.environ["DIM_SERVICE"],
    settings=Settings(heartbeat_interval=0.2, node_ttl=2, leader_ttl=2),
).start()


def app(environ, start_response):
    try:
        body, status = repr(sorted(manager.instances)), "200 OK"
    except ForkedError as exc:
        body, status = f"ForkedError: {exc}", "500 Internal Server Error"
    start_response(status, [("Content-Type", "text/plain")])
    return [body.encode()]
"""


@pytest.mark.slow  # gunicorn processes: one interpreter is enough
def test_gunicorn_preload_of_a_started_manager_raises_forked_error(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, service: str, run_gunicorn: Any
) -> None:
    """A manager started at import under --preload fails in the worker with ForkedError."""
    (tmp_path / "forked_app.py").write_text(_FORKED_APP, encoding="utf-8")
    env = _env(tmp_path, DIM_REDIS_URL=redis_url, DIM_SERVICE=service)
    server = run_gunicorn(["--preload", "--workers", "1", "forked_app:app"], tmp_path, env)
    code, body = server.wait_answering("/")
    assert code == 500, body
    assert body.startswith("ForkedError: ")
    assert f"started in process {server.proc.pid}" in body
    assert "post_fork" in body and "--preload" in body
    assert server.terminate() == 0, server.output()
    assert _leftovers(redis_client, service) == []  # the master stopped its manager at exit


# -- Django ---------------------------------------------------------------------------------


@pytest.mark.slow  # gunicorn processes: one interpreter is enough
def test_django_starts_in_gunicorn_workers_never_in_management_commands(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, service: str, run_gunicorn: Any
) -> None:
    """manage.py commands do not join; 2 gunicorn workers split the configs; SIGTERM cleans up."""
    ledger = tmp_path / "ledger"
    configs = 6
    env = _env(
        tmp_path,
        DIM_REDIS_URL=redis_url,
        DIM_SERVICE=service,
        DIM_SETTINGS=json.dumps(TIMINGS),
        FEEDS=str(configs),
        FEEDS_LEDGER=str(ledger),
    )
    check = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=DJANGO_APP,
        env=env,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert check.returncode == 0, check.stderr
    assert list(redis_client.scan_iter(match=Keys(service).prefix + "*")) == []  # never joined

    # the example's config: 2 workers, no preload, the post_fork and worker_exit hooks
    server = run_gunicorn(["-c", "gunicorn.conf.py"], DJANGO_APP, env)
    server.wait_answering("/dim/")
    wait_until(lambda: len(server.workers()) == 2, DEADLINE, message="2 workers")
    workers = server.workers()
    _wait_for(
        lambda: (
            _settled_on(_status(redis_client, service), workers, configs)
            and _runs_exactly_once(_status(redis_client, service), ledger, ())
        ),
        f"configs spread over workers {sorted(workers)}",
        lambda: _alive_in_ledger(ledger),
    )
    code, body = server.get("/dim/")
    reply = json.loads(body)
    assert code == 200 and reply["pid"] in workers and len(reply["instances"]) == 3

    assert server.terminate() == 0, server.output()
    assert _unclosed(ledger) == []
    assert len(_ledger(ledger)) >= 2 * configs
    assert _leftovers(redis_client, service) == []


def test_django_names_bad_settings(tmp_path: Path, redis_url: str) -> None:
    """A dotted path that does not import: django.setup() still loads (the system checks
    report it as dim.E004), and starting the manager raises it with the DIM key named."""
    script = f"""
import django
from django.conf import settings
from django.core import checks

import dim.contrib.django
from dim import ConfigError

settings.configure(
    INSTALLED_APPS=["dim.contrib.django"],
    DIM={{"REDIS_URL": {redis_url!r}, "SERVICE": "s", "GET_CONFIG": "builtins.list",
         "CREATE": "feeds.nowhere.create"}},
)
django.setup()
print([(m.id, m.msg) for m in checks.run_checks()])
try:
    dim.contrib.django.start()
except ConfigError as exc:
    print("start:", exc)
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert result.returncode == 0, result.stderr
    checked, started = result.stdout.splitlines()
    assert "('dim.E004', \"settings.DIM['CREATE'] = 'feeds.nowhere.create': " in checked
    assert started.startswith("start: settings.DIM['CREATE'] = 'feeds.nowhere.create'")


# -- signals and atexit ---------------------------------------------------------------------


# A plain program, not the shared node program (``python -m tools.chaos node``): these
# tests prove what dim does at exit in a program that installs no signal handler of its
# own and never calls stop() (the node program handles SIGTERM and stops its managers
# itself); its lines are the examples' text ledger that ``_ledger`` reads.
_NODE_SCRIPT = """
import os
import signal
import sys
import threading

from dim import Manager, Settings
from dim.testing import wait_until

mode, redis_url, service, ledger = sys.argv[1:]


def write(line):
    with open(ledger, "a") as out:
        out.write(line + "\\n")


def main():
    tokens = {}

    def create(config):
        tokens[config] = manager.lease(config).token
        write(f"create {os.getpid()} {config} {tokens[config]}")
        return config

    def disconnect(config):
        write(f"disconnect {os.getpid()} {config} {tokens[config]}")

    # leases of 30 s: a node that merely expired would still be in Redis when we look
    settings = Settings(heartbeat_interval=0.2, node_ttl=30, leader_ttl=30)
    manager = Manager(
        lambda: [1, 2, 3], create, None, disconnect,
        redis=redis_url, service=service, settings=settings,
    )
    if mode == "sigterm-handler":
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    manager.start()
    wait_until(lambda: len(manager.instances) == 3, 30)
    write(f"ready {os.getpid()} {manager.node_id} 0")
    if mode != "return":
        threading.Event().wait()  # until SIGTERM
    # no manager.stop(): atexit does it


main()
"""


def _node_process(tmp_path: Path, redis_url: str, service: str, mode: str) -> tuple[Any, Path]:
    """A plain process running one manager with configs 1..3; returns it and its ledger."""
    # history from an earlier node, so this one's leader places the configs without the
    # start-up grace of a brand-new service (one node_ttl: 30 s here)
    with Manager(lambda: [1, 2, 3], str, redis=redis_url, service=service, settings=FAST) as m:
        wait_until(lambda: len(m.instances) == 3, DEADLINE)
    script = tmp_path / "node.py"
    script.write_text(_NODE_SCRIPT, encoding="utf-8")
    ledger = tmp_path / f"ledger-{mode}"
    proc = subprocess.Popen(
        [sys.executable, str(script), mode, redis_url, service, str(ledger)],
        env=_env(tmp_path),
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, ledger


def _ready_node(proc: Any, ledger: Path) -> str:
    def ready() -> Optional[str]:
        if proc.poll() is not None and not any(e[0] == "ready" for e in _ledger(ledger)):
            raise AssertionError(f"node exited with {proc.returncode}: {proc.stderr.read()}")
        return next((e[2] for e in _ledger(ledger) if e[0] == "ready"), None)

    return wait_until(ready, DEADLINE, interval=0.02, message="node never ran its configs")


def _in_cluster(client: redis.Redis, service: str, node_id: str) -> list[str]:
    """What Redis still holds of one node: its membership, node info and claims."""
    keys = Keys(service)
    held = []
    if client.zscore(keys.nodes, node_id) is not None:
        held.append("member")
    if client.exists(keys.node(node_id)):
        held.append("node info")
    for key in client.scan_iter(match=keys.claim("*"), count=1000):
        if (client.get(key) or b"").decode().startswith(node_id + ":"):
            held.append(key.decode())
    return held


def test_process_returning_from_main_leaves_the_cluster_at_once(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, service: str
) -> None:
    """A process that just returns (no stop()) disconnects and leaves via atexit, not TTL."""
    proc, ledger = _node_process(tmp_path, redis_url, service, "return")
    node_id = _ready_node(proc, ledger)
    assert proc.wait(timeout=DEADLINE) == 0, proc.stderr.read()
    assert _in_cluster(redis_client, service, node_id) == []  # leases are 30 s long
    assert _unclosed(ledger) == []
    assert Counter(e[0] for e in _ledger(ledger)) == {"create": 3, "disconnect": 3, "ready": 1}


def test_sigterm_handler_calling_sys_exit_leaves_the_cluster_at_once(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, service: str
) -> None:
    """SIGTERM with a handler that calls sys.exit runs atexit: the node leaves at once."""
    proc, ledger = _node_process(tmp_path, redis_url, service, "sigterm-handler")
    node_id = _ready_node(proc, ledger)
    assert _in_cluster(redis_client, service, node_id) != []
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=DEADLINE) == 0, proc.stderr.read()
    assert _in_cluster(redis_client, service, node_id) == []
    assert _unclosed(ledger) == []


def test_default_sigterm_skips_atexit_and_leaves_the_node_to_expire(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, service: str
) -> None:
    """Without a handler SIGTERM kills at once: no disconnect, the node stays until its TTL."""
    proc, ledger = _node_process(tmp_path, redis_url, service, "sigterm-default")
    node_id = _ready_node(proc, ledger)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=DEADLINE) == -signal.SIGTERM
    assert "member" in _in_cluster(redis_client, service, node_id)
    assert len(_unclosed(ledger)) == 3
