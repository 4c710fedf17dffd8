"""The entries of a scan's event stream in Redis, written by workers and read by the gateway."""

from __future__ import annotations

from typing import Final, Literal

import orjson

EventKind = Literal["progress", "port", "end"]
STREAM_MAXLEN: Final = 10_000
"""Approximate cap on one scan's stream; a scan emits a few progress events a second at most."""


def encode_event(kind: EventKind, data: object) -> dict[str, bytes]:
    return {"kind": kind.encode(), "data": orjson.dumps(data)}
