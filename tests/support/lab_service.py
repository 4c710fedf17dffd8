"""The whole service on a lab: the API on this host, one real worker inside the scanner
namespace (PostgreSQL, Redis and RabbitMQ bridged in with socat)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from shared.settings import Settings
from tests.conftest import base_url, own_stack
from tests.support.lab import BLOCK, LabSpec, lab


@contextmanager
def lab_service(
    spec: LabSpec,
    settings: Settings,
    run_dir: Path,
    name: str,
    *,
    workers: int = 1,
    **changes: Any,
) -> Iterator[str]:
    """A lab for ``spec`` and a stack of its own (settings ``changes`` applied, its worker of
    concurrency ``workers``); yields the API's base URL once the scanner namespace is checked
    to have no default route."""
    with lab(spec) as net:
        net.bridge()
        # A stop that lands while the worker is still acking the last scan starts Celery's
        # soft shutdown, which then waits its whole timeout: 2 s, not 20, as nothing here
        # tests it.
        with own_stack(
            settings,
            run_dir,
            name,
            workers=workers,
            wrap_worker=net.wrap(),
            target_allow=(BLOCK,),
            shutdown_timeout=2,
            **changes,
        ) as stack:
            net.assert_no_default_route()
            yield base_url(stack)
