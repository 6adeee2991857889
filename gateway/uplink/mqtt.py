"""A small MQTT 3.1.1 client on an asyncio Protocol: the only MQTT code in fieldgate.

Why not a library (README, design notes): a publish here must complete at the broker's PUBACK and
hand that fact to the store, and the store, not the client, decides what is resent after a
reconnect. paho-based clients (aiomqtt) cost 140-300 us CPU per QoS 1 publish here; gmqtt costs
50-75 us but keeps PUBACKs and its resend queue to itself and reconnects on tasks of its own.
IoT Hub's device protocol needs only CONNECT, PUBLISH QoS 0/1, PUBACK, SUBSCRIBE and PINGREQ, so
this client implements exactly that, with one future per QoS 1 publish.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, cast

from gateway.core.errors import UplinkCause, UplinkError

log = logging.getLogger(__name__)

CONNECT, CONNACK, PUBLISH, PUBACK = 0x10, 0x20, 0x30, 0x40
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 0x82, 0x90, 0xC0, 0xD0, 0xE0

CONNACK_CODES = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}

# Called with (topic, payload) for each PUBLISH. A QoS 1 message is acknowledged when the
# handler returns, or, when it returns an awaitable, when that completes (a command is
# acknowledged once it was carried out, so that a lost connection means a redelivery).
MessageHandler = Callable[[str, bytes], Awaitable[None] | None]

# OpenSSL's X509_V_ERR_* codes (x509_vfy.h) a hub's certificate is refused with.
_VERIFY_CAUSES: dict[int, UplinkCause] = {
    2: "untrusted",  # unable to get issuer certificate
    7: "untrusted",  # certificate signature failure
    9: "not-yet-valid",
    10: "expired",
    18: "untrusted",  # self-signed certificate
    19: "untrusted",  # self-signed certificate in chain
    20: "untrusted",  # unable to get local issuer certificate
    21: "untrusted",  # unable to verify the first certificate
    26: "eku",  # unsuitable certificate purpose
    62: "hostname",
    64: "hostname",  # IP address mismatch
}


def tls_failure(err: ssl.SSLError) -> tuple[UplinkCause, str]:
    """Why a TLS handshake failed, as a cause and a text that is never empty."""
    if isinstance(err, ssl.SSLCertVerificationError):
        cause = _VERIFY_CAUSES.get(err.verify_code, "untrusted")
        detail = err.verify_message or err.reason or str(err) or f"code {err.verify_code}"
        return cause, f"server certificate refused: {detail}"
    reason = err.reason or str(err) or type(err).__name__
    if "PROTOCOL_VERSION" in reason or "UNSUPPORTED_PROTOCOL" in reason:
        return "protocol", f"handshake failed: no TLS version in common (1.2 or newer): {reason}"
    if isinstance(err, ssl.SSLEOFError):
        return "handshake", f"handshake failed: the server closed the connection: {reason}"
    return "handshake", f"handshake failed: {reason}"


def _os_text(err: OSError) -> str:
    return err.strerror or str(err) or type(err).__name__


# MQTT 3.1.1's wire encodings (also used by the hub stand-in's front, which parses and rewrites
# packets): a remaining length, and a length-prefixed string.
def encode_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def decode_length(buf: bytes | bytearray, pos: int) -> tuple[int, int] | None:
    """The remaining length at ``buf[pos:]`` (1 to 4 bytes of 7 bits each) and where the body
    starts; None while it is incomplete. ValueError: more than 4 bytes."""
    length = shift = 0
    while True:
        if pos >= len(buf):
            return None
        byte = buf[pos]
        length |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return length, pos
        shift += 7
        if shift > 21:
            raise ValueError("malformed packet length")


def encode_string(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


class _Protocol(asyncio.Protocol):
    def __init__(self, client: MqttClient) -> None:
        self._client = client
        self._buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's SSL transport is not an asyncio.Transport subclass, but has its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        client = self._client
        # When these bytes reached us: a handler that works through many messages of one read
        # can tell arrival from its own delay.
        client.read_at = time.time()
        buf = self._buf
        buf += data
        while len(buf) >= 2:
            try:
                found = decode_length(buf, 1)
            except ValueError:
                client._fail(UplinkError("malformed packet length from broker"))
                return
            if found is None:
                return
            length, pos = found
            end = pos + length
            if len(buf) < end:
                return
            first = buf[0]
            body = bytes(buf[pos:end])
            del buf[:end]
            client._packet(first, body)

    def connection_lost(self, exc: Exception | None) -> None:
        self._client._lost(exc)

    def pause_writing(self) -> None:
        self._client._writable.clear()

    def resume_writing(self) -> None:
        self._client._writable.set()


class MqttClient:
    """One MQTT 3.1.1 session over TLS. An async context manager: connected inside the block.

    ``publish`` returns a future that completes at the PUBACK (QoS 1) and fails with
    :class:`UplinkError` if the connection is lost first. ``closed`` completes when the
    connection ends, with the reason as its exception when it was not asked to end.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        client_id: str,
        ssl_context: ssl.SSLContext | None,
        server_hostname: str | None = None,
        username: str | None = None,
        keepalive: int = 60,
        clean_session: bool = True,
        connect_timeout: float = 10.0,
        on_message: MessageHandler | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.client_id = client_id
        self._ssl = ssl_context
        self._server_hostname = server_hostname
        self._username = username
        self._keepalive = keepalive
        self._clean = clean_session
        self._timeout = connect_timeout
        self._on_message = on_message
        self.read_at = 0.0  # wall-clock time of the last read from the broker
        self._protocol: _Protocol | None = None
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._subacks: dict[int, asyncio.Future[list[int]]] = {}
        self._next_id = 0
        self._connack: asyncio.Future[int] | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._ping: asyncio.TimerHandle | None = None
        self._last_in = 0.0
        self._last_out = 0.0
        self._loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._closing = False
        self._handling: set[asyncio.Future[None]] = set()  # handlers whose PUBACK waits

    # -- lifetime ---------------------------------------------------------------------------

    async def __aenter__(self) -> MqttClient:
        await self._connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.disconnect()

    async def _connect(self) -> None:
        where = f"{self.host}:{self.port}"
        try:
            async with asyncio.timeout(self._timeout):
                _, protocol = await self._loop.create_connection(
                    lambda: _Protocol(self),
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self._server_hostname if self._ssl else None,
                )
                self._protocol = protocol
                self._connack = self._loop.create_future()
                self._send_connect()
                code = await self._connack
        except ssl.SSLError as err:
            cause, text = tls_failure(err)
            raise UplinkError(f"{self.client_id}: TLS to {where}: {text}", cause=cause) from err
        except TimeoutError as err:
            self._abort()
            raise UplinkError(
                f"{self.client_id}: connecting to {where} timed out", cause="timeout"
            ) from err
        except UplinkError as err:
            # Lost after the handshake, before any CONNACK: a TLS 1.3 broker refuses a client
            # certificate only now, and says nothing more than this.
            raise UplinkError(
                f"{self.client_id}: {where} ended the connection before its CONNACK (it may "
                f"have refused this device's certificate): {err}",
                cause="handshake",
            ) from err
        except ConnectionResetError as err:
            if err.errno is None and self._ssl is not None:
                # TCP was up and the peer hung up without a word during the TLS handshake
                # (what a server that speaks only TLS 1.1 or other ciphers may do): the error
                # carries no text at all, so say what happened.
                raise UplinkError(
                    f"{self.client_id}: TLS to {where}: handshake failed: the server closed "
                    "the connection (it may offer only TLS versions or ciphers this gateway "
                    "refuses, such as TLS 1.1)",
                    cause="handshake",
                ) from err
            raise UplinkError(
                f"{self.client_id}: cannot reach {where}: {_os_text(err)}", cause="unreachable"
            ) from err
        except OSError as err:
            raise UplinkError(
                f"{self.client_id}: cannot reach {where}: {_os_text(err)}", cause="unreachable"
            ) from err
        if code != 0:
            self._abort()
            reason = CONNACK_CODES.get(code, f"code {code}")
            raise UplinkError(
                f"{self.client_id}: broker refused the connection: {reason} (CONNACK {code})",
                cause="unavailable" if code == 3 else "refused-connack",
                connack=code,
            )
        self._last_in = self._last_out = self._loop.time()
        self._schedule_ping()

    async def disconnect(self) -> None:
        if self.closed.done():
            return
        self._closing = True
        if self._protocol is not None and self._protocol.transport is not None:
            transport = self._protocol.transport
            if not transport.is_closing():
                transport.write(bytes((DISCONNECT, 0)))
                transport.close()
            try:
                async with asyncio.timeout(2):
                    await asyncio.shield(self.closed)
            except (TimeoutError, UplinkError):
                transport.abort()
        self._finish(None)

    def _abort(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.abort()

    # -- sending ----------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._protocol is None or self._protocol.transport is None or self.closed.done():
            raise UplinkError(f"{self.client_id}: not connected")
        self._protocol.transport.write(data)
        self._last_out = self._loop.time()

    def _send_connect(self) -> None:
        flags = 0x02 if self._clean else 0
        payload = encode_string(self.client_id.encode())
        if self._username is not None:
            flags |= 0x80
            payload += encode_string(self._username.encode())
        variable = encode_string(b"MQTT") + bytes((4, flags)) + struct.pack("!H", self._keepalive)
        body = variable + payload
        self._write(bytes((CONNECT,)) + encode_length(len(body)) + body)

    def _packet_id(self) -> int:
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self._pending and self._next_id not in self._subacks:
                return self._next_id
        raise UplinkError(f"{self.client_id}: no free packet id")

    def tls_cipher(self) -> tuple[str, str] | None:
        """The negotiated TLS suite and version, or None without a TLS connection."""
        transport = self._protocol.transport if self._protocol is not None else None
        info = transport.get_extra_info("cipher") if transport is not None else None
        return (str(info[0]), str(info[1])) if info else None

    @property
    def inflight(self) -> int:
        return len(self._pending)

    async def writable(self) -> None:
        """Wait until the transport's write buffer has drained below its high-water mark."""
        await self._writable.wait()

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> asyncio.Future[None] | None:
        """Send a PUBLISH; for QoS 1 the returned future completes at the PUBACK."""
        encoded = topic.encode()
        if qos == 0:
            head = (
                bytes((PUBLISH,))
                + encode_length(2 + len(encoded) + len(payload))
                + encode_string(encoded)
            )
            self._write(head + payload)
            return None
        pid = self._packet_id()
        head = (
            bytes((PUBLISH | 0x02,))
            + encode_length(4 + len(encoded) + len(payload))
            + encode_string(encoded)
            + struct.pack("!H", pid)
        )
        self._write(head + payload)
        future: asyncio.Future[None] = self._loop.create_future()
        self._pending[pid] = future
        return future

    async def subscribe(self, filters: list[tuple[str, int]]) -> list[int]:
        """Subscribe and return the granted QoS per filter (0x80 means refused)."""
        pid = self._packet_id()
        body = struct.pack("!H", pid) + b"".join(
            encode_string(f.encode()) + bytes((qos,)) for f, qos in filters
        )
        future: asyncio.Future[list[int]] = self._loop.create_future()
        self._subacks[pid] = future
        self._write(bytes((SUBSCRIBE,)) + encode_length(len(body)) + body)
        try:
            async with asyncio.timeout(self._timeout):
                return await future
        except TimeoutError as err:
            self._subacks.pop(pid, None)
            raise UplinkError(
                f"{self.client_id}: no SUBACK within {self._timeout:g} s", cause="timeout"
            ) from err

    # -- receiving --------------------------------------------------------------------------

    def _packet(self, first: int, body: bytes) -> None:
        self._last_in = self._loop.time()
        kind = first & 0xF0
        if kind == PUBACK:
            (pid,) = struct.unpack_from("!H", body)
            future = self._pending.pop(pid, None)
            if future is not None and not future.done():
                future.set_result(None)
        elif kind == PUBLISH:
            self._incoming(first, body)
        elif kind == CONNACK:
            if self._connack is not None and not self._connack.done():
                self._connack.set_result(body[1] if len(body) >= 2 else 255)
        elif kind == SUBACK:
            (pid,) = struct.unpack_from("!H", body)
            sub = self._subacks.pop(pid, None)
            if sub is not None and not sub.done():
                sub.set_result(list(body[2:]))
        elif kind == PINGRESP:
            pass
        else:
            log.debug("%s: ignored packet type 0x%02x", self.client_id, first)

    def _incoming(self, first: int, body: bytes) -> None:
        qos = (first >> 1) & 0x03
        (tlen,) = struct.unpack_from("!H", body)
        topic = body[2 : 2 + tlen].decode("utf-8", "replace")
        pos = 2 + tlen
        pid = None
        if qos:
            (pid,) = struct.unpack_from("!H", body, pos)
            pos += 2
        pending: Awaitable[None] | None = None
        if self._on_message is not None:
            try:
                pending = self._on_message(topic, body[pos:])
            except Exception:
                # A consumer's bug must not take the session down; the message is still acked
                # because MQTT 3.1.1 offers no negative acknowledgement.
                log.exception("%s: message handler failed for %s", self.client_id, topic)
        if pid is None:
            return
        if pending is None:
            self._puback(pid)
            return
        task = asyncio.ensure_future(pending)
        self._handling.add(task)
        task.add_done_callback(partial(self._handled, pid, topic))

    def _handled(self, pid: int, topic: str, task: asyncio.Future[None]) -> None:
        self._handling.discard(task)
        if task.cancelled() or self.closed.done():
            return  # no acknowledgement: the broker delivers it again on the next connection
        if task.exception() is not None:
            # Not carried out: no acknowledgement, so the broker delivers it again on the
            # next connection (MQTT 3.1.1 has no negative acknowledgement).
            log.error(
                "%s: message handler failed for %s; left unacknowledged",
                self.client_id,
                topic,
                exc_info=task.exception(),
            )
            return
        self._puback(pid)

    def _puback(self, pid: int) -> None:
        self._write(bytes((PUBACK, 2)) + struct.pack("!H", pid))

    # -- keepalive and loss -----------------------------------------------------------------

    def _schedule_ping(self) -> None:
        self._ping = self._loop.call_later(self._keepalive / 2, self._keepalive_tick)

    def _keepalive_tick(self) -> None:
        if self.closed.done():
            return
        now = self._loop.time()
        if now - self._last_in > self._keepalive * 1.5:
            self._fail(
                UplinkError(f"{self.client_id}: broker silent for {now - self._last_in:.0f} s")
            )
            return
        if (
            now - self._last_out >= self._keepalive / 2
            or now - self._last_in >= self._keepalive / 2
        ):
            self._write(bytes((PINGREQ, 0)))
        self._schedule_ping()

    def _fail(self, err: UplinkError) -> None:
        self._abort()
        self._finish(err)

    def _lost(self, exc: Exception | None) -> None:
        if self._closing:
            self._finish(None)
            return
        reason = f": {exc}" if exc else ""
        self._finish(
            UplinkError(f"{self.client_id}: connection to {self.host}:{self.port} lost{reason}")
        )

    def _finish(self, err: UplinkError | None) -> None:
        if self._ping is not None:
            self._ping.cancel()
        for task in self._handling:
            task.cancel("the connection ended")
        self._handling.clear()
        failure = err or UplinkError(f"{self.client_id}: disconnected")
        waiting: list[asyncio.Future[Any]] = [*self._pending.values(), *self._subacks.values()]
        for future in waiting:
            if not future.done():
                future.set_exception(failure)
        self._pending.clear()
        self._subacks.clear()
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(failure)
        if not self.closed.done():
            if err is None:
                self.closed.set_result(None)
            else:
                self.closed.set_exception(err)
                # Retrieved here so a loss nobody awaited is not reported as "never retrieved".
                self.closed.exception()
        self._writable.set()
