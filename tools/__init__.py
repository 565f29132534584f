"""The project's own tooling: not part of the installed ``dim`` package.

Run it from a checkout (``python -m tools.chaos ...`` from the repository root); the
test suite and the benchmark scripts import it from here. Nothing under ``dim/`` may
import it.
"""
