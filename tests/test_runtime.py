"""dim refuses to start where its threads would not be real threads (dim.runtime): a
process that gevent or eventlet monkey-patched, a uWSGI without enable-threads, a uWSGI
master that forks the app without lazy-apps. Each one for real: a monkey-patched
process, a gunicorn gevent worker, a uWSGI server."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dim.testing import free_port, wait_until

from .helpers import dim_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

START = """
import sys
from dim import ConfigError, Manager
manager = Manager(list, object, redis={url!r}, service={service!r})
try:
    manager.start()
except ConfigError as exc:
    print("REFUSED", exc)
    sys.exit(3)
print("STARTED")
manager.stop()
"""


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=dim_env(PYTHONWARNINGS="ignore"),
        check=False,
    )


@pytest.mark.parametrize(
    ("patch", "name"),
    [
        ("from gevent import monkey; monkey.patch_all()", "gevent"),
        ("import eventlet; eventlet.monkey_patch()", "eventlet"),
    ],
)
def test_a_monkey_patched_process_is_refused_at_start(
    patch: str, name: str, redis_url: str, service: str
) -> None:
    result = run_python(patch + "\n" + START.format(url=redis_url, service=service))
    assert result.returncode == 3, result.stdout + result.stderr
    assert f"REFUSED dim cannot run in a process that {name} monkey-patched" in result.stdout
    assert "dim run package.module:factory" in result.stdout


def test_an_unpatched_process_with_gevent_imported_starts(redis_url: str, service: str) -> None:
    result = run_python("import gevent\n" + START.format(url=redis_url, service=service))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "STARTED" in result.stdout


def test_a_gunicorn_gevent_worker_fails_to_boot_saying_why(
    tmp_path: Path, redis_url: str, service: str
) -> None:
    (tmp_path / "app.py").write_text(
        textwrap.dedent(
            f"""
            from dim import Manager
            manager = Manager(list, object, redis={redis_url!r}, service={service!r})

            def app(environ, start_response):
                start_response("200 OK", [])
                return [b"ok"]
            """
        )
    )
    (tmp_path / "gunicorn.conf.py").write_text(
        "def post_worker_init(worker):\n    from app import manager\n    manager.start()\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", "1", "--bind",
         f"127.0.0.1:{free_port()}", "app:app"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env=dim_env(PYTHONWARNINGS="ignore"), check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "dim cannot run in a process that gevent monkey-patched" in result.stderr
    assert "Worker failed to boot" in result.stderr


def test_a_gevent_worker_is_refused_in_post_fork_before_gevent_patches(
    tmp_path: Path, redis_url: str, service: str
) -> None:
    """gunicorn runs post_fork before its gevent worker monkey-patches: dim.contrib's
    post_fork (what the docs recommend, with --preload) must refuse there too."""
    (tmp_path / "app.py").write_text(
        textwrap.dedent(
            f"""
            from dim import Manager
            from dim.contrib import ProcessManager

            pm = ProcessManager(
                lambda: Manager(list, object, redis={redis_url!r}, service={service!r}),
                "test",
            )
            pm.start()  # deferred in the master: starts in post_fork

            def app(environ, start_response):
                start_response("200 OK", [])
                return [b"ok"]
            """
        )
    )
    (tmp_path / "gunicorn.conf.py").write_text(
        "from dim.contrib import post_fork, worker_exit  # noqa: F401\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", "1", "--preload", "--bind",
         f"127.0.0.1:{free_port()}", "app:app"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env=dim_env(PYTHONWARNINGS="ignore"), check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "dim cannot run in a process that gevent monkey-patched" in result.stderr
    assert "Worker failed to boot" in result.stderr


UWSGI_APP = """
import os
from dim import ConfigError, Manager
manager = Manager(list, object, redis={url!r}, service={service!r})
try:
    manager.start()
    outcome = "started"
except ConfigError as exc:
    outcome = "refused: " + str(exc)
with open({out!r}, "a") as f:
    f.write(outcome + "\\n")

def application(environ, start_response):
    start_response("200 OK", [])
    return [b"ok"]
"""


# next to this interpreter (a virtualenv not on PATH), else on PATH
UWSGI = shutil.which(
    "uwsgi", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
)


@pytest.mark.skipif(UWSGI is None, reason="uwsgi is not installed (tox's py311 installs it)")
@pytest.mark.parametrize(
    ("options", "outcome"),
    [
        ([], "refused: dim cannot start here: uWSGI runs no thread"),
        (["--enable-threads", "--master"], "refused: dim cannot start here: uWSGI loads"),
        (["--enable-threads", "--master", "--lazy-apps"], "started"),
    ],
)
def test_uwsgi_without_threads_or_lazy_apps_is_refused(
    options: list[str], outcome: str, tmp_path: Path, redis_url: str, service: str
) -> None:
    out = tmp_path / "outcome.txt"
    (tmp_path / "wsgi_app.py").write_text(
        UWSGI_APP.format(url=redis_url, service=service, out=str(out))
    )
    server = subprocess.Popen(
        [str(UWSGI), "--http-socket", f"127.0.0.1:{free_port()}", "--module", "wsgi_app",
         "--processes", "1", "--die-on-term", *options],
        cwd=tmp_path, env=dim_env(PYTHONPATH=str(tmp_path)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        wait_until(lambda: out.exists() and out.read_text().strip(), 30, message="no outcome")
        assert out.read_text().splitlines()[0].startswith(outcome)
    finally:
        # SIGINT: uWSGI's "stop now" (SIGTERM may wait out a worker's reload mercy)
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
