"""The lab needs root (network namespaces), nftables and socat."""

from __future__ import annotations

import pytest

from tests import needs


@pytest.fixture(autouse=True)
def _lab_tools() -> None:
    needs.root_with_iproute2()
    needs.tool("nft")
    needs.tool("socat")
