"""The orjson codec both sides speak on the wire and in the result backend."""

from __future__ import annotations

from typing import Any, Final

import orjson

CODEC_NAME: Final = "orjson"
CONTENT_TYPE: Final = "application/x-orjson"
CONTENT_ENCODING: Final = "utf-8"

_OPTIONS: Final = orjson.OPT_NON_STR_KEYS


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, option=_OPTIONS, default=_default)


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    if isinstance(data, memoryview):
        data = bytes(data)
    return orjson.loads(data)


def _default(obj: Any) -> Any:
    if isinstance(obj, BaseException):
        # Celery stores exceptions as {"exc_type", "exc_message", "exc_module"} before encoding;
        # anything else that reaches us is a bug in the caller, made visible rather than crashing.
        return {"exc_type": type(obj).__name__, "exc_message": [str(obj)]}
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not serialisable by the orjson codec")


def register_with_kombu() -> None:
    """Teach kombu the codec; the worker (and any Celery client) calls this before use."""
    from kombu.serialization import register

    register(
        CODEC_NAME,
        dumps,  # type: ignore[arg-type]  # kombu publishes bytes as they are
        loads,
        content_type=CONTENT_TYPE,
        content_encoding=CONTENT_ENCODING,
    )
