"""``python -m tools.chaos {node|run} [options]`` from the repository root."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Optional

USAGE = "usage: python -m tools.chaos {node|run} [options]  (--help after either)"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Dispatch to the node program or the seeded run (each imported only when asked)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "node":
        from tools.chaos.node import node_main

        return node_main(args[1:])
    if args and args[0] == "run":
        from tools.chaos.runner import run_main

        return run_main(args[1:])
    print(USAGE)
    return 2


if __name__ == "__main__":
    sys.exit(main())
