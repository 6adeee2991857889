"""``fieldgate hub invoke|c2d|twin``: the stand-in's service side from the command line.

Each run connects as the service identity through the front of a running ``fieldgate
localhub``, does one thing, prints the answer as JSON and exits: 0 when the hub's status is
2xx, 1 otherwise, 2 when the request itself is malformed or the hub cannot be reached.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import orjson

from gateway.core.errors import FieldgateError
from gateway.identity.pki import Pki
from gateway.testbed.localhub.control import HubControl


def _json(text: str | None, what: str) -> Any:
    if text is None:
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as err:
        raise FieldgateError(f"{what}: not JSON ({err}): {text!r}") from err


def _print(value: object) -> None:
    print(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode(), flush=True)


def run_hub_tool(
    action: str,
    *,
    pki_dir: Path,
    host: str,
    port: int,
    device: str,
    method: str | None = None,
    payload: str | None = None,
    timeout: float = 30.0,
    body: str | None = None,
    message_id: str | None = None,
    desired: str | None = None,
) -> int:
    try:
        pki = Pki(pki_dir)
        request = {
            "invoke": lambda: _json(payload, "--payload"),
            "c2d": lambda: _json(body, "the C2D body"),
            "twin": lambda: _json(desired, "--desired"),
        }[action]()
    except FieldgateError as err:
        print(f"fieldgate hub {action}: {err}", file=sys.stderr)
        return 2

    async def go() -> int:
        async with HubControl(pki, host, port) as hub:
            if action == "invoke":
                assert method is not None
                status, answer = await hub.invoke(device, method, request, timeout)
                print(status, flush=True)
                _print(answer)
                return 0 if 200 <= status < 300 else 1
            if action == "c2d":
                mid = await hub.c2d(device, request, message_id)
                _print({"device": device, "message_id": mid})
                return 0
            twin = await (hub.desire(device, request) if request is not None else hub.twin(device))
            _print(twin)
            return 0

    try:
        return asyncio.run(go())
    except FieldgateError as err:
        print(f"fieldgate hub {action}: {err}", file=sys.stderr)
        return 1 if "refused" in str(err) else 2
