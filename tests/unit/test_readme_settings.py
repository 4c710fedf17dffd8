"""The README's settings table is the documentation of every setting: it must not drift."""

from __future__ import annotations

import re
from pathlib import Path

from shared.settings import ENV_PREFIX, Settings

README = Path(__file__).resolve().parents[2] / "README.md"
ROW = re.compile(r"^\| `(?P<name>" + ENV_PREFIX + r"[A-Z_]+)` \| (?P<default>[^|]+) \|", re.M)


def documented() -> dict[str, str]:
    return {m["name"]: m["default"].strip() for m in ROW.finditer(README.read_text())}


def same(documented: str, default: object) -> bool:
    if default in ((), None, ""):
        return documented == "(none)"
    text = documented.strip("`")
    if isinstance(default, int | float) and not isinstance(default, bool):
        return float(text) == default
    return text == str(default)


def test_every_setting_is_in_the_table_with_its_default() -> None:
    table = documented()
    fields = {
        ENV_PREFIX + name.upper(): info.default for name, info in Settings.model_fields.items()
    }
    assert sorted(table) == sorted(fields)
    for name, default in fields.items():
        assert same(table[name], default), (name, table[name], default)
