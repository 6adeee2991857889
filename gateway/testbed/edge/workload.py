"""A stand-in for the IoT Edge workload API: HTTP/1.1 over a unix socket, one per module (as
the 1.2+ runtime mounts a socket per module), serving the two calls azure-iot-device's edge
HSM (``iothub/edge_hsm.py``) makes:

- ``GET /trust-bundle?api-version=V`` -> 200 ``{"certificate": PEM}``: the roots that the
  module must trust for edgeHub's server certificate (here: the stand-in hub's root).
- ``POST /modules/{module}/genid/{generation}/sign?api-version=V`` with
  ``{"keyId": "primary", "algo": "HMACSHA256", "data": base64}`` -> 200
  ``{"digest": base64(HMAC-SHA256(module key, data))}``.

Anything else, a module or generation id that is not this socket's module, an api-version
other than the runtime's, or a malformed body gets an error status with ``{"message": ...}``
and is recorded in :attr:`WorkloadApi.refused`. The request handling is pure
(:func:`answer`); the server only frames HTTP. Limits: one request per connection
(``Connection: close``), no chunked bodies, no certificate or decrypt calls.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import orjson

from gateway.testbed.edge.sas import Module, sign

MAX_REQUEST = 64 * 1024
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


@dataclass
class Calls:
    """What the stand-in was asked (tests count token signings)."""

    signed: int = 0
    bundles: int = 0
    refused: list[str] = field(default_factory=list)


def answer(
    method: str,
    target: str,
    body: bytes,
    *,
    module: Module,
    api_version: str,
    bundle: str,
    calls: Calls,
) -> tuple[int, object]:
    """One request -> (status, JSON body)."""
    url = urlsplit(target)
    versions = parse_qs(url.query).get("api-version", [])
    parts = [unquote(p) for p in url.path.strip("/").split("/")]

    def refuse(status: int, why: str) -> tuple[int, object]:
        calls.refused.append(f"{method} {url.path}: {why}")
        return status, {"message": why}

    if versions != [api_version]:
        return refuse(400, f"api-version {versions} is not this runtime's {api_version!r}")
    if parts == ["trust-bundle"]:
        if method != "GET":
            return refuse(405, f"{method} on trust-bundle")
        calls.bundles += 1
        return 200, {"certificate": bundle}
    if len(parts) == 5 and parts[0] == "modules" and parts[2] == "genid" and parts[4] == "sign":
        if method != "POST":
            return refuse(405, f"{method} on sign")
        if parts[1] != module.module:
            return refuse(404, f"module {parts[1]!r} is not this socket's {module.module!r}")
        if parts[3] != module.generation_id:
            return refuse(404, f"generation id {parts[3]!r} is not the module's current one")
        try:
            request = orjson.loads(body)
            data = base64.b64decode(request["data"], validate=True)
            key_id, algo = request["keyId"], request["algo"]
        except (orjson.JSONDecodeError, KeyError, TypeError, binascii.Error):
            return refuse(400, "sign body is not {keyId, algo, data: base64}")
        if key_id != "primary" or algo != "HMACSHA256":
            return refuse(400, f"keyId {key_id!r} / algo {algo!r}: only primary / HMACSHA256")
        calls.signed += 1
        return 200, {"digest": sign(module.key, data)}
    return refuse(404, f"no such call: {url.path}")


class WorkloadApi:
    """``async with WorkloadApi(path, module, bundle_pem):`` serves until the block ends."""

    def __init__(
        self, path: Path, module: Module, bundle: str, *, api_version: str = "2019-01-30"
    ) -> None:
        self.path = path
        self.module = module
        self.bundle = bundle
        self.api_version = api_version
        self.calls = Calls()
        self._server: asyncio.Server | None = None

    @property
    def uri(self) -> str:
        """What the runtime puts in IOTEDGE_WORKLOADURI."""
        return f"unix://{self.path}"

    async def __aenter__(self) -> WorkloadApi:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._serve, str(self.path))
        os.chmod(self.path, 0o600)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, value = await self._one(reader)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as err:
            self.calls.refused.append(f"malformed request: {err}")
            status, value = 400, {"message": f"malformed request: {err}"}
        body = orjson.dumps(value)
        head = (
            f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        try:
            writer.write(head.encode() + body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _one(self, reader: asyncio.StreamReader) -> tuple[int, object]:
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > MAX_REQUEST:
            raise ValueError("request head too large")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", ""):
            raise ValueError("chunked bodies are not supported by the stand-in")
        length = int(headers.get("content-length", "0"))
        if not 0 <= length <= MAX_REQUEST:
            raise ValueError(f"content-length {length}")
        body = await reader.readexactly(length) if length else b""
        return answer(
            method,
            target,
            body,
            module=self.module,
            api_version=self.api_version,
            bundle=self.bundle,
            calls=self.calls,
        )
