"""Time `dim.balance.assign` at growing scale: from scratch, after a join, after a leave.

For each (configs, nodes) size the script times ``assign`` several times per scenario
and prints the median, min and max wall time, the peak memory of one extra run traced
with ``tracemalloc`` (tracing slows the code, so it is never timed), and how many
surviving configs moved compared with the minimum that balance requires.  The minimum
is computed here from scratch for equal weights: the nodes keeping the most get the
ceiling quotas.  Results are also written as JSON.

With ``--tag-groups G`` each size also runs the same three scenarios under eligibility
constraints, in rows named ``scratch/3g`` and so on; without it the output is unchanged.
Node ``node-i`` carries tag ``i % G`` (the joining node carries tag 0), and config ``i``
needs the tag ``i % G`` unless ``i % (G + 1) == G``, in which case it may run anywhere.
The closed-form minimum does not apply under constraints, so these rows show ``n/a`` in
the ``min`` and ``ratio`` columns (``null`` in JSON); tests/test_balance.py checks, by
exhaustive search on small cases, that moves under constraints are the minimum balance
allows.

Usage::

    python benchmarks/assign_scale.py                 # full run, about a minute at most
    python benchmarks/assign_scale.py --quick         # smoke test, a few seconds
    python benchmarks/assign_scale.py --tag-groups 3  # plus rows with 3 tag groups
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
from typing import Any, Optional

from _harness import ROOT

from dim.balance import assign, moves

FULL_SIZES = [(1_000, 10), (10_000, 100), (20_000, 1_000), (100_000, 1_000)]
QUICK_SIZES = [(200, 4), (1_000, 4), (2_000, 20)]
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


def tag_requirements(configs: list[str], groups: int) -> dict[str, int]:
    """Return the tag each constrained config needs; the others may run anywhere."""
    return {config: i % groups for i, config in enumerate(configs) if i % (groups + 1) != groups}


def tagged_eligibility(
    nodes: Mapping[str, float], needs: Mapping[str, int], groups: int
) -> dict[str, frozenset[str]]:
    """Map each constrained config to the live nodes carrying its tag.

    Configs with the same requirement share one set object, as a coordinator computing
    eligibility from tags would do (and as ``assign`` profits from).
    """
    carriers: list[set[str]] = [set() for _ in range(groups)]
    for node in nodes:
        carriers[0 if node == "node-new" else int(node.rsplit("-", 1)[1]) % groups].add(node)
    frozen = [frozenset(members) for members in carriers]
    return {config: frozen[tag] for config, tag in needs.items()}


def moves_ratio(moved: int, minimum: Optional[int]) -> Optional[float]:
    """Return moves over the minimum, or None when the minimum is unknown or zero."""
    if minimum is None:
        return None
    if minimum == 0:
        # 0/0 means nothing had to move and nothing did: a perfect score.
        return 1.0 if moved == 0 else None
    return moved / minimum


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


def run_size(
    n_configs: int, n_nodes: int, repeats: int, tag_groups: int = 0
) -> list[dict[str, Any]]:
    """Benchmark the three scenarios for one size and return one row per scenario.

    With ``tag_groups`` the scenarios run under eligibility constraints (see the module
    docstring) and their names carry a ``/<G>g`` suffix.
    """
    nodes = {f"node-{i}": 1.0 for i in range(n_nodes)}
    configs = [f"tenant-{i // 7}/worker-{i}" for i in range(n_configs)]
    needs = tag_requirements(configs, tag_groups) if tag_groups else {}
    suffix = f"/{tag_groups}g" if tag_groups else ""

    def eligibility(live: Mapping[str, float]) -> Optional[dict[str, frozenset[str]]]:
        return tagged_eligibility(live, needs, tag_groups) if tag_groups else None

    start = assign(nodes, configs, {}, eligible=eligibility(nodes))
    scenarios: list[tuple[str, dict[str, float], dict[str, str]]] = [
        ("scratch", nodes, {}),
        ("join", {**nodes, "node-new": 1.0}, start),
        ("leave", {n: w for n, w in nodes.items() if n != "node-0"}, start),
    ]
    rows = []
    for name, live, current in scenarios:
        eligible = eligibility(live)

        def call(
            live: dict[str, float] = live,
            current: dict[str, str] = current,
            eligible: Optional[dict[str, frozenset[str]]] = eligible,
        ) -> object:
            return assign(live, configs, current, eligible=eligible)

        timings = time_calls(call, repeats)
        result = assign(live, configs, current, eligible=eligible)
        moved = surviving_moves(live, configs, current, result)
        minimum = minimum_moves(live, configs, current) if eligible is None else None
        rows.append(
            {
                "configs": n_configs,
                "nodes": n_nodes,
                "scenario": name + suffix,
                "tag_groups": tag_groups,
                "repeats": repeats,
                "median_s": statistics.median(timings),
                "min_s": min(timings),
                "max_s": max(timings),
                "peak_bytes": peak_memory(call),
                "moves": moved,
                "minimum_moves": minimum,
                "moves_ratio": moves_ratio(moved, minimum),
                "reassigned": sum(1 for c in configs if current.get(c) != result.get(c)),
            }
        )
    return rows


def growth_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each scenario and node count, how the median time grows with the configs
    between consecutive sizes, measured in this one run (not quadratic: well under the
    square of the size ratio)."""
    out = []
    keyed: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        keyed.setdefault((row["scenario"], row["nodes"]), []).append(row)
    for (scenario, nodes), group in keyed.items():
        group.sort(key=lambda r: r["configs"])
        for small, large in zip(group, group[1:]):
            out.append(
                {
                    "scenario": scenario,
                    "nodes": nodes,
                    "from_configs": small["configs"],
                    "to_configs": large["configs"],
                    "size_ratio": large["configs"] / small["configs"],
                    "time_ratio": large["median_s"] / small["median_s"],
                }
            )
    return out


def print_table(rows: list[dict[str, Any]]) -> None:
    """Print the rows as an aligned text table."""
    width = max([8] + [len(row["scenario"]) for row in rows])
    header = (
        f"{'configs':>8} {'nodes':>6} {'scenario':<{width}} {'median ms':>10} {'min ms':>8} "
        f"{'max ms':>8} {'peak MiB':>9} {'moves':>6} {'min':>6} {'ratio':>6} {'reassigned':>10}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        ratio = "n/a" if row["moves_ratio"] is None else f"{row['moves_ratio']:.2f}"
        minimum = "n/a" if row["minimum_moves"] is None else row["minimum_moves"]
        print(
            f"{row['configs']:>8} {row['nodes']:>6} {row['scenario']:<{width}} "
            f"{row['median_s'] * 1e3:>10.1f} {row['min_s'] * 1e3:>8.1f} "
            f"{row['max_s'] * 1e3:>8.1f} {row['peak_bytes'] / 2**20:>9.1f} "
            f"{row['moves']:>6} {minimum:>6} {ratio:>6} {row['reassigned']:>10}"
        )


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the benchmark, print the table and write the JSON file."""
    parser = argparse.ArgumentParser(description="Time dim.balance.assign at growing scale.")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes and 3 repeats, for a smoke test"
    )
    parser.add_argument("--repeats", type=int, help="timed calls per scenario (default 5)")
    parser.add_argument(
        "--tag-groups",
        type=int,
        default=0,
        metavar="G",
        help="also run each size with G tag groups of eligibility (default 0: off)",
    )
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
        if args.tag_groups:
            rows.extend(run_size(n_configs, n_nodes, repeats, args.tag_groups))
    print_table(rows)
    growth = growth_rows(rows)
    for row in growth:
        print(
            f"{row['scenario']}: {row['from_configs']} -> {row['to_configs']} configs on "
            f"{row['nodes']} nodes (x{row['size_ratio']:.1f}): time x{row['time_ratio']:.1f} "
            f"(linear x{row['size_ratio']:.1f}, quadratic x{row['size_ratio'] ** 2:.0f})"
        )

    output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "assign_scale",
        "quick": args.quick,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "rows": rows,
        "growth": growth,
    }
    output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
