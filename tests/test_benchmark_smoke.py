"""The benchmark scripts still run (tiny sizes), so they do not rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.bench_smoke


def test_assign_scale_quick(tmp_path: Path) -> None:
    """benchmarks/assign_scale.py --quick prints a table and saves balanced, minimal results."""
    out = tmp_path / "assign.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "assign_scale.py"),
            "--quick",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "median" in result.stdout.lower()
    rows = json.loads(out.read_text())["rows"]
    assert {r["scenario"] for r in rows} >= {"scratch", "join", "leave"}
    assert all(r["moves"] == r["minimum_moves"] for r in rows)
    growth = json.loads(out.read_text())["growth"]
    assert {(g["from_configs"], g["to_configs"], g["nodes"]) for g in growth} == {(200, 1000, 4)}
    assert "time x" in result.stdout
