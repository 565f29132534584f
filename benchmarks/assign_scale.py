"""Time `dim.balance.assign` at growing scale: from scratch, after a join, after a leave.

For each (configs, nodes) size the script times ``assign`` several times per scenario
and prints the median, min and max wall time, the peak memory of one extra run traced
with ``tracemalloc`` (tracing slows the code, so it is never timed), and how many
surviving configs moved compared with the minimum that balance requires.  The minimum
is computed here from scratch for equal weights: the nodes keeping the most get the
ceiling quotas.  Results are also written as JSON.

Usage::

    python benchmarks/assign_scale.py            # full run, about a minute at most
    python benchmarks/assign_scale.py --quick    # smoke test, a few seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Running the file directly puts benchmarks/ first on sys.path, not the repository.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dim.balance import assign, moves  # noqa: E402

FULL_SIZES = [(1_000, 10), (10_000, 100), (100_000, 1_000)]
QUICK_SIZES = [(200, 4), (2_000, 20)]
RESULTS_DIR = ROOT / "benchmarks" / "results"


def minimum_moves(
    nodes: Mapping[str, float], configs: list[str], current: Mapping[str, str]
) -> int:
    """Return the fewest surviving configs any balanced placement must move (equal weights)."""
    wanted = set(configs)
    kept = Counter(node for config, node in current.items() if config in wanted and node in nodes)
    base, spare = divmod(len(wanted), len(nodes))
    ranked = sorted((kept[node] for node in nodes), reverse=True)
    return sum(max(0, count - base - (rank < spare)) for rank, count in enumerate(ranked))


def surviving_moves(
    nodes: Mapping[str, float],
    configs: list[str],
    current: Mapping[str, str],
    result: Mapping[str, str],
) -> int:
    """Count configs that moved although their old node is live and they are still wanted."""
    wanted = set(configs)
    live = {c: n for c, n in current.items() if c in wanted and n in nodes}
    return moves(live, result)


def time_calls(call: Callable[[], object], repeats: int) -> list[float]:
    """Return the wall time of each of ``repeats`` calls, in seconds."""
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        timings.append(time.perf_counter() - started)
    return timings


def peak_memory(call: Callable[[], object]) -> int:
    """Return the peak bytes traced by ``tracemalloc`` during one call."""
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def run_size(n_configs: int, n_nodes: int, repeats: int) -> list[dict[str, Any]]:
    """Benchmark the three scenarios for one size and return one row per scenario."""
    nodes = {f"node-{i}": 1.0 for i in range(n_nodes)}
    configs = [f"tenant-{i // 7}/worker-{i}" for i in range(n_configs)]
    start = assign(nodes, configs, {})
    scenarios: list[tuple[str, dict[str, float], dict[str, str]]] = [
        ("scratch", nodes, {}),
        ("join", {**nodes, "node-new": 1.0}, start),
        ("leave", {n: w for n, w in nodes.items() if n != "node-0"}, start),
    ]
    rows = []
    for name, live, current in scenarios:

        def call(live: dict[str, float] = live, current: dict[str, str] = current) -> object:
            return assign(live, configs, current)

        timings = time_calls(call, repeats)
        result = assign(live, configs, current)
        moved = surviving_moves(live, configs, current, result)
        minimum = minimum_moves(live, configs, current)
        rows.append(
            {
                "configs": n_configs,
                "nodes": n_nodes,
                "scenario": name,
                "repeats": repeats,
                "median_s": statistics.median(timings),
                "min_s": min(timings),
                "max_s": max(timings),
                "peak_bytes": peak_memory(call),
                "moves": moved,
                "minimum_moves": minimum,
                # 0/0 means nothing had to move and nothing did: a perfect score.
                "moves_ratio": moved / minimum if minimum else (1.0 if moved == 0 else None),
                "reassigned": sum(1 for c in configs if current.get(c) != result[c]),
            }
        )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    """Print the rows as an aligned text table."""
    header = (
        f"{'configs':>8} {'nodes':>6} {'scenario':<8} {'median ms':>10} {'min ms':>8} "
        f"{'max ms':>8} {'peak MiB':>9} {'moves':>6} {'min':>6} {'ratio':>6} {'reassigned':>10}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        ratio = "n/a" if row["moves_ratio"] is None else f"{row['moves_ratio']:.2f}"
        print(
            f"{row['configs']:>8} {row['nodes']:>6} {row['scenario']:<8} "
            f"{row['median_s'] * 1e3:>10.1f} {row['min_s'] * 1e3:>8.1f} "
            f"{row['max_s'] * 1e3:>8.1f} {row['peak_bytes'] / 2**20:>9.1f} "
            f"{row['moves']:>6} {row['minimum_moves']:>6} {ratio:>6} {row['reassigned']:>10}"
        )


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the benchmark, print the table and write the JSON file."""
    parser = argparse.ArgumentParser(description="Time dim.balance.assign at growing scale.")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes and 3 repeats, for a smoke test"
    )
    parser.add_argument("--repeats", type=int, help="timed calls per scenario (default 5)")
    parser.add_argument(
        "--output",
        type=Path,
        help="JSON path (default benchmarks/results/assign_scale.json, or "
        "assign_scale.quick.json with --quick so smoke runs never overwrite real numbers)",
    )
    args = parser.parse_args(argv)
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    repeats = args.repeats or (3 if args.quick else 5)
    output = args.output or RESULTS_DIR / (
        "assign_scale.quick.json" if args.quick else "assign_scale.json"
    )

    rows: list[dict[str, Any]] = []
    for n_configs, n_nodes in sizes:
        rows.extend(run_size(n_configs, n_nodes, repeats))
    print_table(rows)

    output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "assign_scale",
        "quick": args.quick,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "rows": rows,
    }
    output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
