"""JSON: the one home of orjson (envelopes' plaintext, security events, records, bond books)."""

from __future__ import annotations

from typing import Any

import orjson

JSONDecodeError = orjson.JSONDecodeError


def dumps(value: Any, *, indent: bool = False) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 if indent else None)


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    return orjson.loads(data)
