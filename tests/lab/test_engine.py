"""The engine on a lab network: discovery, -Pn, filtered ranges, loss, rate, tarpits.

Every scan runs inside the lab's scanner namespace (no default route, asserted first) and
targets only the lab's 198.19.0.0/24.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.lab import Lab, LabSpec, lab

pytestmark = pytest.mark.netns

LIVE, CLOSED_ONLY, ECHO_ONLY = "198.19.0.10", "198.19.0.11", "198.19.0.12"
SPEC = LabSpec(
    up={LIVE: [22, 80, 150], CLOSED_ONLY: [], ECHO_ONLY: [8080]},
    filtered={LIVE: "1-50", ECHO_ONLY: "1-1000"},
)


@pytest.fixture(scope="module")
def net() -> Iterator[Lab]:
    with lab(SPEC) as running:
        yield running


def opened(report: dict[str, Any]) -> set[tuple[str, int]]:
    return {(address, port) for address, port in report["open"]}


def hosts(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {host["address"]: host for host in report["hosts"]}


def test_discovery_marks_live_hosts_up_and_dropped_ones_down(net: Lab) -> None:
    report = net.scan("198.19.0.8/29", "22,80,150,443", {"retries": 1})
    found = hosts(report)
    assert {a: (h["up"], h["reason"]) for a, h in found.items()} == {
        "198.19.0.9": (False, "no-response"),
        LIVE: (True, "syn-ack"),
        CLOSED_ONLY: (True, "reset"),
        ECHO_ONLY: (True, "echo-reply"),
        "198.19.0.13": (False, "no-response"),
        "198.19.0.14": (False, "no-response"),
    }
    assert opened(report) == {(LIVE, 80), (LIVE, 150)}  # 22 lies in LIVE's filtered 1-50
    assert all(h["probes"] == 0 for h in found.values() if not h["up"])
    # Discovery said up, yet every port probe went unanswered: reported, not dropped.
    assert found[ECHO_ONLY]["unresponsive"]
    assert not found[LIVE]["unresponsive"]


def test_discovery_off_scans_every_address(net: Lab) -> None:
    report = net.scan("198.19.0.8/29", "80", {"discovery": False, "retries": 1})
    found = hosts(report)
    assert len(found) == 6  # a /29's host addresses, as the service expands it
    assert all(h["up"] and h["reason"] == "user-set" for h in found.values())
    assert found["198.19.0.9"]["unresponsive"]
    assert found["198.19.0.9"]["retransmissions"] == 1
    assert ["198.19.0.9", 80, "no-response"] in report["filtered"]
    assert opened(report) == {(LIVE, 80)}


def test_filtered_range_is_filtered_after_the_retries(net: Lab) -> None:
    report = net.scan(LIVE, "1-200", {"retries": 2})
    filtered = {port for address, port, reason in report["filtered"] if reason == "no-response"}
    assert filtered == set(range(1, 51))
    assert len(report["filtered"]) == 50
    assert opened(report) == {(LIVE, 80), (LIVE, 150)}
    assert report["closed"] == 148
    # No loss here: only the dropped range is retransmitted, each port ``retries`` times (50
    # unanswered retransmissions stay within the allowance before nmap's bound applies).
    assert report["retransmissions"] == 50 * 2


def test_open_set_equals_truth_under_syn_loss() -> None:
    # nftables' numgen has no seed: the loss differs run to run, hence several runs.
    spec = LabSpec(up={LIVE: [22, 80, 150, 299], CLOSED_ONLY: [1, 2, 3]}, loss=5)
    truth = {(a, p) for a, p in spec.truth}
    with lab(spec) as lossy:
        for _run in range(3):
            report = lossy.scan("198.19.0.8/29", "1-300", {"retries": 3})
            assert opened(report) == truth
            assert report["retransmissions"] > 0
            # Without retransmission ~5% of the closed ports came back filtered; a port now
            # needs its SYN lost on every allowed attempt (nmap's retry rule) to end so.
            assert len(report["filtered"]) <= 3, report["filtered"]


def test_rate_bounds_the_probes_counted_at_the_target() -> None:
    rate = 400
    with lab(LabSpec(up={LIVE: [80]})) as paced:
        paced.reset_syn_count()
        report = paced.scan("198.19.0.8/30", "1-300", {"rate": rate, "retries": 0})
        syns = paced.syn_count()
    # Every SYN the target namespace saw, discovery's included, went out within the engine's
    # own ``seconds``: no more than the rate allows, plus one burst.
    assert syns >= report["probes"] >= 300
    burst = max(1, rate // 50)
    assert syns <= rate * report["seconds"] + burst


def test_a_host_answering_on_every_port_is_flagged_a_tarpit() -> None:
    spec = LabSpec(up={LIVE: [22, 80]}, tarpits={CLOSED_ONLY: "1-100"})
    with lab(spec) as trap:
        report = trap.scan("198.19.0.8/29", "1-100", {})
    found = hosts(report)
    assert found[CLOSED_ONLY]["tarpit"]
    assert not found[LIVE]["tarpit"]
    assert opened(report) == spec.truth
