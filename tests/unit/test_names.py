"""Lists of states and priorities come from the Literal types; copies that cannot be derived
(the CLI's enums, which typer needs as classes) are held to them here."""

from __future__ import annotations

from typing import get_args

from cybersec_cli import client
from shared.protocol import PRIORITIES
from shared.schemas import EndedScanState, Priority, ScanState


def test_priorities_everywhere_are_the_literal_ones() -> None:
    assert tuple(PRIORITIES) == get_args(Priority)
    assert tuple(p.value for p in client.Priority) == get_args(Priority)


def test_scan_states_everywhere_are_the_literal_ones() -> None:
    assert get_args(ScanState) == ("queued", "running", *get_args(EndedScanState))
    assert tuple(s.value for s in client.ScanRowState) == get_args(ScanState)
