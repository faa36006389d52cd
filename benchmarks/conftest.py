"""Shared by the benchmark files: a place for results and a closing summary table with ratios (pytest-benchmark's
own table has no cross-provider ratios)."""

import pytest


def pytest_configure(config):
    config.auxfuse_results = {}  # (table, row, column) -> value; filled by the benchmark files


@pytest.fixture
def bench_results(pytestconfig):
    return pytestconfig.auxfuse_results


def pytest_terminal_summary(terminalreporter, config):
    results = getattr(config, "auxfuse_results", {})
    tables = {}
    for (table, row, column), value in results.items():
        if table.startswith("_"):  # raw values kept for other tests
            continue
        tables.setdefault(table, {}).setdefault(row, {})[column] = value
    for table, rows in tables.items():
        columns = []
        for row in rows.values():
            columns += [c for c in row if c not in columns]
        width = max(len(r) for r in rows) + 2
        terminalreporter.write_sep("-", table)
        terminalreporter.write_line("".ljust(width) + "".join(f"{c:>14}" for c in columns))
        for name, row in rows.items():
            cells = "".join(f"{row[c]:>14}" if c in row else f"{'':>14}" for c in columns)
            terminalreporter.write_line(name.ljust(width) + cells)
