"""Smoke runs of the process benchmarks at tiny sizes, so the scripts do not rot.

Benchmarks are not tests: nothing here checks a timing. Each script runs once with the
smallest settings that still exercise every code path, and must exit 0 and write its
JSON report with the expected shape. ``versus_tooz.py`` needs tooz, which is never a
dependency of dim: without it the script must say how to install it and exit 2; with
it (``DIM_BENCH_TOOZ_PYTHON`` naming an interpreter that has tooz, or tooz importable
here) it runs too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.bench_smoke
BENCH = ROOT / "benchmarks"


def run(script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a benchmark script; on timeout stop it with SIGTERM first, so that it stops
    its node processes and its Redis server, then fail."""
    process = subprocess.Popen(
        [sys.executable, str(BENCH / script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        pytest.fail(f"{script} did not finish within {timeout:g} s:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def report(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    assert data["quick"] is True
    assert data["machine"]["cpu_count"] >= 1
    return data


def test_rebalance_latency_smoke(tmp_path: Path) -> None:
    out = tmp_path / "latency.json"
    result = run(
        "rebalance_latency.py",
        "--quick",
        "--nodes",
        "2",
        "--configs",
        "6",
        "--reps",
        "1",
        "--events",
        "join",
        "leave",
        "crash",
        "config_add",
        "config_change",
        "--hb",
        "0.05",
        "--ttl",
        "0.4",
        "--output",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "median ms" in result.stdout
    data = report(out)
    events = {row["event"] for row in data["summary"]}
    assert events == {"join", "leave", "crash", "config_add", "config_change"}
    assert data["floor"]["start"]["rtt"]["n"] > 0
    assert all(row["failed"] == 0 for row in data["summary"])


def test_idle_cost_smoke(tmp_path: Path) -> None:
    out = tmp_path / "idle.json"
    result = run(
        "idle_cost.py", "--quick", "--window", "1", "--layouts", "2x10", "--output", str(out)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = report(out)
    roles = {row["role"] for row in data["summary"]}
    assert roles == {"leader", "follower"}
    assert all(row["cpu_percent_of_core"] >= 0 for row in data["summary"])


def test_scale_smoke(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    result = run(
        "scale.py",
        "--quick",
        "--nodes",
        "2",
        "--configs",
        "10",
        "--reps",
        "1",
        "--large",
        "1x3",
        "--large-configs",
        "9",
        "--idle-window",
        "0.5",
        "--output",
        str(out),
        # 44 s on an idle machine (the large cluster alone takes 14 s to converge on a
        # fresh Redis): 60 s was too tight under tox -p on 2 cores
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = report(out)
    assert {row["event"] for row in data["summary"]} == {"join", "leave"}
    # bytes out from the pass without MONITOR, for every row
    assert all(row["net_out"] is not None for row in data["summary"])
    assert data["large_cluster"]["nodes"] == 3


def test_rolling_restart_smoke(tmp_path: Path) -> None:
    out = tmp_path / "rolling.json"
    result = run("rolling_restart.py", "--quick", "--output", str(out), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["variant"]: row for row in report(out)["results"]}
    assert set(rows) == {"plain", "paced", "static", "static+paced"}
    assert all(row["duplicates"] == 0 for row in rows.values())
    # a restarted node with a static name gets its own configs back: nothing moves
    assert rows["static"]["moved"] == 0 and rows["plain"]["moved"] > 0


def _tooz_python() -> Optional[str]:
    explicit = os.environ.get("DIM_BENCH_TOOZ_PYTHON")
    python = explicit or sys.executable
    probe = subprocess.run(
        [python, "-c", "import tooz.coordination"], capture_output=True, timeout=60
    )
    return python if probe.returncode == 0 else None


def test_versus_tooz_smoke(tmp_path: Path) -> None:
    out = tmp_path / "versus.json"
    python = _tooz_python()
    if python is None:
        result = run("versus_tooz.py", "--quick", "--output", str(out))
        assert result.returncode == 2
        assert "pip install tooz" in result.stderr
        assert not out.exists()
        pytest.skip("tooz is not installed (set DIM_BENCH_TOOZ_PYTHON to run this smoke test)")
    result = run(
        "versus_tooz.py",
        "--quick",
        "--tooz-python",
        python,
        "--nodes",
        "2",
        "--configs",
        "8",
        "--reps",
        "1",
        "--ttl",
        "0.5",
        "--poll",
        "0.05",
        "--output",
        str(out),
        timeout=90,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = report(out)
    assert {row["system"] for row in data["summary"]} == {"dim", "tooz"}
    assert {r["event"] for r in data["ratios"]} == {"join", "leave", "crash"}


def test_takeover_smoke(tmp_path: Path) -> None:
    """takeover.py measures a crash and a Redis restart and says how they compare with
    the bounds the settings promise."""
    out = tmp_path / "takeover.json"
    result = run("takeover.py", "--quick", "--output", str(out), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    data = report(out)
    (row,) = data["rows"]
    assert row["profile"] == "fast" and len(row["crash_takeover"]) == 1
    assert len(row["reset_recovery"]) == 1 and row["lease"] > 0


def test_capacity_smoke(tmp_path: Path) -> None:
    """capacity.py drives simulated members against a real leader and reports each cell."""
    out = tmp_path / "capacity.json"
    result = run(
        "capacity.py",
        "--quick",
        "--nodes",
        "10",
        "--configs",
        "100",
        "--window",
        "1",
        "--output",
        str(out),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "scripts/s" in result.stdout
    data = report(out)
    (cell,) = data["cells"]
    assert cell["ok"], cell.get("error") or cell.get("not_converged_state")
    assert cell["generator"]["dropped_members"] == 0
    assert cell["leader"]["plan"]["n"] >= 1


def test_instance_cost_smoke(tmp_path: Path) -> None:
    """instance_cost.py joins and stops a node per size and fits a line over the sizes."""
    out = tmp_path / "cost.json"
    result = run("instance_cost.py", "--quick", "--reps", "1", "--output", str(out), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ms of CPU per create" in result.stdout
    data = report(out)
    assert [c["configs"] for c in data["cells"]] == [1, 10]
    assert all(c["join_cpu"] > 0 and c["leave_cpu"] > 0 for c in data["cells"])
    assert data["lines"]["join"]["slope"] is not None
