"""The figures the reliability suites print: recorded per test, shown in pytest's summary.

Under ``pytest -n 2`` each worker keeps its own list; ``conftest.py`` ships it to the
controller (``workeroutput``), which prints every line in a ``reliability figures`` section.
"""

from __future__ import annotations

FIGURES: list[str] = []


def record(suite: str, line: str) -> None:
    """One line of figures for ``suite`` (e.g. ``hostile-http``, ``chaos``, ``soak``)."""
    FIGURES.append(f"[{suite}] {line}")
