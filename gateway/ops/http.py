"""The ops listener: ``GET /metrics``, ``/healthz``, ``/readyz`` over HTTP/1.1, on the
gateway's own loop (``asyncio.start_server``; no threads reading loop state).

A deliberately small server: one request per connection (``Connection: close``), GET and HEAD
only, a request head of at most 8 KiB read within a few seconds. Scrapers and probes need no
more, and a slow or hostile client costs one coroutine until its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger("fieldgate.ops")

HEAD_LIMIT = 8192
HEAD_TIMEOUT = 5.0
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


@dataclass(slots=True)
class Response:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


# (path, headers with lower-case names) -> response
Handler = Callable[[str, dict[str, str]], Awaitable[Response]]


def parse_head(head: bytes) -> tuple[str, str, dict[str, str]] | None:
    """(method, path without query, headers) of a request head, or None if malformed."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        return None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return None
    method, target, _ = parts
    headers = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            return None
        headers[name.strip().lower()] = value.strip()
    return method, target.split("?", 1)[0], headers


def encode(response: Response, *, head_only: bool = False) -> bytes:
    reason = REASONS.get(response.status, "")
    headers = {"Content-Length": str(len(response.body)), "Connection": "close"}
    headers.update(response.headers)
    lines = [f"HTTP/1.1 {response.status} {reason}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    out = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return out if head_only else out + response.body


class OpsServer:
    """Routes paths to handlers; serves until :meth:`close`."""

    def __init__(self, routes: dict[str, Handler]) -> None:
        self._routes = routes
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port, limit=HEAD_LIMIT)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(HEAD_TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                return
            if len(head) > HEAD_LIMIT:
                writer.write(encode(Response(400, b"request head too large\n")))
                return
            parsed = parse_head(head[:-4])
            if parsed is None:
                writer.write(encode(Response(400, b"malformed request\n")))
                return
            method, path, headers = parsed
            handler = self._routes.get(path)
            if handler is None:
                response = Response(404, b"not found: try /metrics, /healthz, /readyz\n")
            elif method not in ("GET", "HEAD"):
                response = Response(405, b"GET or HEAD only\n", {"Allow": "GET, HEAD"})
            else:
                response = await handler(path, headers)
            writer.write(encode(response, head_only=method == "HEAD"))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        except ConnectionError:
            pass
        except Exception:  # a handler's bug must not end the listener
            log.exception("ops listener: request failed")
        finally:
            writer.close()
