"""The dim command embedded in an application (manage.py dim, flask dim): its Admin comes
from the application, so its subcommands take no connection options and it has no demo."""

from __future__ import annotations

import pytest

from dim.admin import Admin
from dim.cli import main


def test_an_embedded_command_uses_the_applications_admin(redis_url, service, capsys):
    code = main(["status", "--json"], prog="manage.py dim", admin=lambda: Admin(redis_url, service))
    assert code == 0
    assert f'"service": "{service}"' in capsys.readouterr().out


def test_an_embedded_command_takes_no_connection_options(redis_url, service, capsys):
    with pytest.raises(SystemExit) as exc:
        main(
            ["status", "--redis", redis_url],
            prog="flask dim",
            admin=lambda: Admin(redis_url, service),
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("flask dim: error: unrecognized arguments: --redis")
    with pytest.raises(SystemExit):
        main(["demo"], prog="flask dim", admin=lambda: Admin(redis_url, service))


def test_an_embedded_run_takes_no_target_and_needs_the_applications_manager(
    redis_url, service, capsys
):
    """Embedded, ``run`` runs the app's manager (no TARGET); without one there is no run."""
    admin = lambda: Admin(redis_url, service)  # noqa: E731
    with pytest.raises(SystemExit) as exc:
        main(["run", "app:make"], prog="flask dim", admin=admin, manager=lambda: None)
    assert exc.value.code == 2
    assert "unrecognized arguments: app:make" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["run"], prog="flask dim", admin=admin)
    assert exc.value.code == 2
    assert "invalid choice: 'run'" in capsys.readouterr().err
