"""The ``dim`` command's arguments, run in this process (``dim.cli.main``) against real
Redis: connection options before or after the subcommand (the later one wins), their
environment variables, one-line errors with exit code 2, and a help that lists only the
public subcommands."""

from __future__ import annotations

import json
import os
import re

import pytest

from dim.admin import Admin
from dim.cli import main


def dim(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``dim ARGS`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse: --help, bad arguments
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def service_of(out: str) -> str:
    return str(json.loads(out)["service"])


@pytest.fixture(autouse=True)
def no_dim_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No DIM_* variable of the calling shell reaches the command."""
    for name in [n for n in os.environ if n.startswith("DIM_")]:
        monkeypatch.delenv(name)


def test_connection_options_before_or_after_the_subcommand(
    capsys: pytest.CaptureFixture[str], redis_url: str, service: str
) -> None:
    """--redis and --service work before the subcommand, after it, or split."""
    for args in (
        ["--redis", redis_url, "--service", service, "status", "--json"],
        ["status", "--json", "--redis", redis_url, "--service", service],
        ["--redis", redis_url, "status", "--service", service, "--json"],
    ):
        code, out, err = dim(capsys, *args)
        assert (code, err) == (0, ""), args
        assert service_of(out) == service


def test_the_later_option_wins(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    redis_url: str,
    service: str,
) -> None:
    """After the subcommand beats before it, and either beats the environment."""
    code, out, _ = dim(
        capsys, "--service", "other", "status", "--service", service, "--redis", redis_url, "--json"
    )
    assert code == 0 and service_of(out) == service
    monkeypatch.setenv("DIM_SERVICE", "from-env")
    monkeypatch.setenv("DIM_REDIS_URL", redis_url)
    code, out, _ = dim(capsys, "--service", service, "status", "--json")
    assert code == 0 and service_of(out) == service
    code, out, _ = dim(capsys, "status", "--json")
    assert code == 0 and service_of(out) == "from-env"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--service", "no spaces", "status"], "argument --service: service must be"),
        (["status", "--service", "no spaces"], "argument --service: service must be"),
        (["--redis", "http://x", "--service", "x", "status"], "argument --redis: "),
        (["wait", "--service", "x"], "one of the arguments --settled is required"),
        (["wait", "--settled", "--timeout", "0", "--service", "x"], "argument --timeout"),
        (["status", "--min-nodes", "-1", "--service", "x"], "argument --min-nodes"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments_are_one_line_with_exit_code_2(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    """A bad argument, before or after the subcommand: exit 2, one line naming it."""
    code, out, err = dim(capsys, *args)
    assert code == 2 and out == ""
    (line,) = err.splitlines()
    assert re.match(r"dim( \w+)?: error: ", line) and message in line, line
    assert "demo-node" not in line


def test_a_bad_environment_variable_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad $DIM_SERVICE or $DIM_REDIS_URL: exit 2, one line naming the variable."""
    monkeypatch.setenv("DIM_SERVICE", "no spaces")
    code, _, err = dim(capsys, "status")
    assert code == 2
    (line,) = err.splitlines()
    assert line.startswith("dim status: error: $DIM_SERVICE: service must be"), line
    monkeypatch.setenv("DIM_SERVICE", "x")
    monkeypatch.setenv("DIM_REDIS_URL", "http://:secret@x")
    code, _, err = dim(capsys, "status")
    assert code == 2
    (line,) = err.splitlines()
    assert line.startswith("dim status: error: $DIM_REDIS_URL: "), line
    assert "secret" not in line


def test_help_lists_the_public_subcommands_only(capsys: pytest.CaptureFixture[str]) -> None:
    """--help and the usage line list every public subcommand and not demo-node."""
    code, out, _ = dim(capsys, "--help")
    assert code == 0
    assert "demo-node" not in out
    usage = out.split("\n\n")[0]
    assert "{status,watch,config,rebalance,pause,resume,drain,wait,run,demo}" in usage, usage
    for option in ("--redis", "--service", "DIM_REDIS_URL"):
        assert option in out
    code, out, _ = dim(capsys, "status", "--help")
    assert code == 0 and "--redis" in out and "--check" in out
    code, out, err = dim(capsys)
    assert code == 2 and "demo-node" not in err


def test_embedded_command_has_no_connection_options(
    capsys: pytest.CaptureFixture[str], redis_url: str, service: str
) -> None:
    """An embedded command (admin=) takes no connection option, before or after, and
    has the deploy checks."""
    for args in (["--redis", redis_url, "status"], ["status", "--service", service]):
        with pytest.raises(SystemExit) as exc:
            main(args, prog="flask dim", admin=lambda: Admin(redis_url, service))
        assert exc.value.code == 2
    capsys.readouterr()
    code = main(["status", "--check"], prog="flask dim", admin=lambda: Admin(redis_url, service))
    assert code == 1
    assert capsys.readouterr().err == "flask dim status: not settled: no live nodes\n"
    with pytest.raises(SystemExit) as exc:
        main(["--help"], prog="flask dim", admin=lambda: Admin(redis_url, service))
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--redis" not in out and "DIM_" not in out and "demo" not in out
    assert "{status,watch,config,rebalance,pause,resume,drain,wait}" in out
