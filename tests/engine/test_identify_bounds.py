"""Service identification is bounded per scan: ports per host and seconds (issue 16, item 2).

Before, a host with every port open was identified port by port, for hours; now a result never
asks for more ports than it can list, and what is not named by the scan's deadline keeps its
registered name.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from shared.schemas import MAX_OPEN_PORTS_PER_HOST, ScanConfig
from worker_service.job import identify_services


async def test_no_more_ports_are_identified_than_a_result_lists(
    listeners: Callable[..., list[int]],
) -> None:
    refusing = listeners(MAX_OPEN_PORTS_PER_HOST + 76, listen=False)
    until = asyncio.get_running_loop().time() + 60
    named = await identify_services("127.0.0.1", refusing, ScanConfig(timeout=0.5), until)
    assert sorted(named) == sorted(refusing[:MAX_OPEN_PORTS_PER_HOST])


async def test_identification_stops_at_the_scans_deadline(
    listeners: Callable[..., list[int]],
) -> None:
    silent = listeners(3)  # accept, never say a word: each would take its whole timeout
    until = asyncio.get_running_loop().time() + 0.2
    named = await identify_services("127.0.0.1", silent, ScanConfig(timeout=1.0), until)
    assert named == {}
