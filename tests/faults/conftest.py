"""Fault tests break this machine's RabbitMQ, PostgreSQL, Redis and workers for real, then
restore them; each prints what happened to a batch of scans."""

from __future__ import annotations

from typing import Any

import pytest

REPORT: list[dict[str, Any]] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not REPORT:
        return
    write = terminalreporter.write_line
    terminalreporter.section("fault tests: what happened to every accepted scan")
    columns = (
        "fault",
        "submitted",
        "accepted",
        "refused_503",
        "completed",
        "failed",
        "lost",
        "duplicated",
    )
    write("  ".join(f"{c:>12}" if c != "fault" else f"{c:<26}" for c in columns))
    for row in REPORT:
        write("  ".join(f"{row[c]!s:>12}" if c != "fault" else f"{row[c]:<26}" for c in columns))
    for row in REPORT:
        for reason in row.get("reasons", []):
            write(f"  {row['fault']}: failed with reason: {reason}")


@pytest.fixture
def report() -> list[dict[str, Any]]:
    return REPORT
