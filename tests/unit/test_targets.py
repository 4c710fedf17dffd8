from __future__ import annotations

import pytest

from shared.targets import TargetError, parse_target


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("127.0.0.1", "ip", "127.0.0.1"),
        (" ::1 ", "ip", "::1"),
        ("2001:DB8:0:0::1", "ip", "2001:db8::1"),
        ("Example.COM.", "hostname", "example.com"),
        ("localhost", "hostname", "localhost"),
        ("a-b.c9.example", "hostname", "a-b.c9.example"),
        ("127.0.0.0/30", "network", "127.0.0.0/30"),
        ("127.0.0.5/30", "network", "127.0.0.4/30"),
        ("::1/128", "network", "::1/128"),
        ("fe80::1%eth0", "ip", "fe80::1%eth0"),
        ("fe80::1%2", "ip", "fe80::1%2"),
    ],
)
def test_parse(text: str, kind: str, value: str) -> None:
    target = parse_target(text)
    assert (target.kind, target.value) == (kind, value)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not a host!",
        "300.1.2.3",
        "-bad.example",
        "bad-.example",
        "a..b",
        "1.2.3",
        "x" * 64,
        "10.0.0.0/33",
        "foo/24",
        "under_score.example",
        "localhost\n.x",
        "::1%a b",
        "::1%lo\nx",
        "::1%\u00e9",
        "::1%" + "x" * 16,
        "::1%\u0000/128",
    ],
)
def test_rejects(text: str) -> None:
    with pytest.raises(TargetError):
        parse_target(text)


def test_network_size_is_bounded() -> None:
    assert parse_target("10.0.0.0/24").kind == "network"
    with pytest.raises(TargetError, match="the bound is 256"):
        parse_target("10.0.0.0/23")
    with pytest.raises(TargetError, match="the bound is 16"):
        parse_target("10.0.0.0/24", max_hosts=16)
