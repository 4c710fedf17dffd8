"""What some tests need from the machine: a missing need skips locally and fails in CI.

``.ci/run`` installs every tool named here, so in CI (``CI`` set) a skip could only hide a
broken set-up.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest


def missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI installs it: see .ci/run)")
    pytest.skip(reason)


def tool(name: str) -> str:
    """The tool's path."""
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is not installed")
    assert path is not None
    return path


def file(path: Path, package: str) -> Path:
    if not path.exists():
        missing(f"{path} is missing (Debian package {package})")
    return path


def root_with_iproute2() -> None:
    if os.geteuid() != 0:
        missing("needs root for network namespaces")
    tool("ip")


def ipv6() -> None:
    if not socket.has_ipv6:
        missing("no IPv6")
