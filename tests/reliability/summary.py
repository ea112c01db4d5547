"""A pytest plugin for the reliability suites: their marker and the summary of their figures.

Loaded from ``tests/conftest.py`` (``pytest_plugins``), because under ``pytest -n 2`` the
controller, which prints the summary, never loads ``tests/reliability/conftest.py``.

Every test in tests/reliability carries the ``reliability`` marker (select with
``-m reliability``); they run in the default suite too. Each suite records figures (cases tried
per input kind, requests by outcome, recovery times, growth) with
:func:`tests.reliability.figures.record`; they are printed at the end of the run in a
``reliability figures`` section, with or without ``-n``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.reliability import figures

HERE = Path(__file__).parent
_WORKER_KEY = "reliability_figures"
_COLLECTED: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "reliability: hostile-input, chaos and soak suites (tests/reliability)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.reliability)


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput: dict[str, Any] | None = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: hand the lines to the controller
        workeroutput[_WORKER_KEY] = json.dumps(figures.FIGURES)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    output = getattr(node, "workeroutput", None) or {}
    _COLLECTED.extend(json.loads(output.get(_WORKER_KEY, "[]")))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    lines = [*_COLLECTED, *figures.FIGURES]
    if lines:
        terminalreporter.section("reliability figures")
        for line in sorted(lines, key=lambda line: line.split("]")[0]):
            terminalreporter.write_line(line)
