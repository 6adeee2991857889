"""The stand-in's TLS front: what makes mosquitto behave like IoT Hub per connection.

mosquitto alone cannot: ``$iothub/methods/POST/#`` and ``$iothub/twin/...`` carry no device id,
so on one broker device A receives B's method calls and twin answers; and on MQTT 3.1.1 it
PUBACKs a forbidden publish and drops it silently, where IoT Hub closes the connection. So the
front terminates TLS (TLS 1.2+, AEAD suites only, a client certificate required, the PKI root
trusted), takes the identity from the certificate's CN, and relays MQTT 3.1.1 to mosquitto on a
unix socket only it can reach, judging and rewriting packets on the way:

- CONNECT: a device's client id must be its CN and its username ``{hub}/{CN}/?api-version=..``
  (IoT Hub: client id = device id); otherwise CONNACK 5 and close. The inner username is the CN
  (mosquitto's ACL keys on it); any password is dropped.
- a device may PUBLISH only on :data:`iothub.DEVICE_PUBLISHES` for its id and SUBSCRIBE only to
  :data:`iothub.DEVICE_RECEIVES`; anything else closes the connection with no PUBACK/SUBACK and
  is recorded (a ``refused {json}`` line in the broker log, and :attr:`Front.violations`).
- ``$iothub/X`` of a device is ``$iothub/{CN}/X`` inside (:func:`inner_topic`), both ways, so
  mosquitto routes method calls and twin answers per device. Packet ids pass unchanged.
- the service identities (hub-service, hub-monitor) pass unscoped: the service side addresses
  devices by the inner topics, and mosquitto's ACL still applies.
- as an edgeHub stand-in (``sas=`` given, :mod:`gateway.testbed.edge`), a connection without a
  client certificate may CONNECT as a module identity with a SAS token as its password; the
  check is the caller's (it returns the identity ``{device}/modules/{module}``, or why not:
  CONNACK 5 and a recorded refusal). That identity is then scoped like a device's: its
  telemetry topic is ``devices/{device}/modules/{module}/messages/events``, its ``$iothub/X``
  is ``$iothub/{device}/modules/{module}/X`` inside.

The judging is pure (:func:`judge_publish`, :func:`judge_subscribe`, :func:`judge_connect`);
the protocols around it only move bytes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, cast

import orjson

from gateway.core import iothub
from gateway.core.tlsprofile import MIN_VERSION, TLS12_CIPHERS
from gateway.identity.pki import MONITOR_IDENTITY, SERVICE_IDENTITY
from gateway.uplink.mqtt import decode_length, encode_length, encode_string

log = logging.getLogger("fieldgate.localhub.front")

CONNECT, CONNACK, PUBLISH, SUBSCRIBE, UNSUBSCRIBE, DISCONNECT = 0x10, 0x20, 0x30, 0x80, 0xA0, 0xE0
SERVICE_IDENTITIES = frozenset({SERVICE_IDENTITY, MONITOR_IDENTITY})
IOTHUB = "$iothub/"

# The front's own inner user: it announces which devices are connected (retained, per device)
# so that the service side can answer 404 for a device that is not, as IoT Hub does.
FRONT_USER = "fieldgate-front"
CONTROL = "fieldgate-hub/"
PRESENCE = CONTROL + "presence/"
EPOCH = CONTROL + "epoch"
REFUSED_MARK = "fieldgate-front: refused "


# A module's CONNECT (no certificate, a SAS token as password) -> (identity, why refused).
SasCheck = Callable[["Connect"], tuple[str | None, str | None]]


def inner_topic(device: str, topic: str) -> str:
    """A device's ``$iothub/X`` as mosquitto sees it: ``$iothub/{device}/X``."""
    return f"{IOTHUB}{device}/{topic[len(IOTHUB) :]}" if topic.startswith(IOTHUB) else topic


def outer_topic(device: str, topic: str) -> str | None:
    """Back to the device's view; None when ``topic`` is another device's $iothub topic."""
    if not topic.startswith(IOTHUB):
        return topic
    own = f"{IOTHUB}{device}/"
    if not topic.startswith(own):
        return None
    rest = topic[len(own) :]
    # A device's prefix also starts its modules' topics (edgeHub stand-in): never theirs.
    return None if rest.startswith("modules/") else IOTHUB + rest


def presence_topic(device: str) -> str:
    return PRESENCE + device


def inner_acl() -> str:
    """mosquitto's ACL on the inner listener: IoT Hub's device topics with ``%u`` (the CN the
    front set as username), the $iothub ones in their per-device inner form."""
    lines = [
        f"user {SERVICE_IDENTITY}",
        "topic readwrite #",
        "topic readwrite $iothub/#",  # `#` does not match $-topics
        f"user {MONITOR_IDENTITY}",
        f"topic read {iothub.ALL_TELEMETRY}",
        f"user {FRONT_USER}",
        f"topic write {CONTROL}#",
        *(
            f"pattern write {inner_topic('%u', t.format(device='%u'))}"
            for t in iothub.DEVICE_PUBLISHES
        ),
        *(
            f"pattern read {inner_topic('%u', t.format(device='%u'))}"
            for t in iothub.DEVICE_RECEIVES
        ),
    ]
    return "\n".join(lines) + "\n"


# -- pure judging --------------------------------------------------------------------------


def _within(device: str, name: str, allowed: tuple[str, ...], *, wildcards: bool) -> bool:
    if not wildcards and ("+" in name or "#" in name):
        return False
    for pattern in allowed:
        base = pattern.format(device=device).removesuffix("/#")
        if name == base or name.startswith(base + "/"):
            return True
    return False


def judge_publish(device: str, topic: str, qos: int) -> str | None:
    """Why a device may not publish this (None: it may)."""
    if qos > 1:
        return "QoS 2 is not supported by IoT Hub"
    if not _within(device, topic, iothub.DEVICE_PUBLISHES, wildcards=False):
        return "not one of this identity's publish topics"
    return None


def judge_subscribe(device: str, topic_filter: str) -> str | None:
    if not _within(device, topic_filter, iothub.DEVICE_RECEIVES, wildcards=True):
        return "not one of this identity's receive topics"
    return None


@dataclass(frozen=True)
class Connect:
    """The parts of an MQTT 3.1.1 CONNECT the front judges and rewrites."""

    level: int
    flags: int
    keepalive: int
    client_id: str
    will_topic: str | None
    will_message: bytes
    username: str | None
    password: bytes | None = None  # a module's SAS token (edgeHub stand-in); dropped inside


def parse_connect(body: bytes) -> Connect:
    """Raises ValueError on a malformed CONNECT."""
    pos = 0

    def take() -> bytes:
        nonlocal pos
        if pos + 2 > len(body):
            raise ValueError("truncated CONNECT")
        (n,) = struct.unpack_from("!H", body, pos)
        if pos + 2 + n > len(body):
            raise ValueError("truncated CONNECT")
        out = body[pos + 2 : pos + 2 + n]
        pos += 2 + n
        return out

    name = take()
    if name != b"MQTT" or pos + 4 > len(body):
        raise ValueError(f"not MQTT 3.1.1 (protocol name {name!r})")
    level, flags = body[pos], body[pos + 1]
    (keepalive,) = struct.unpack_from("!H", body, pos + 2)
    pos += 4
    client_id = take().decode("utf-8", "replace")
    will_topic, will_message = None, b""
    if flags & 0x04:
        will_topic = take().decode("utf-8", "replace")
        will_message = take()
    username = take().decode("utf-8", "replace") if flags & 0x80 else None
    password = take() if flags & 0x40 else None
    return Connect(level, flags, keepalive, client_id, will_topic, will_message, username, password)


def judge_connect(cn: str, connect: Connect) -> str | None:
    if connect.level != 4:
        return f"MQTT protocol level {connect.level}: IoT Hub speaks 3.1.1 (level 4) here"
    if cn in SERVICE_IDENTITIES:
        return None
    if any(c in cn for c in "/+#") or not cn:
        # IoT Hub's device ids have none of them; here they would break the per-device scope.
        return f"certificate CN {cn!r} is not a device id (empty, or has '/', '+' or '#')"
    if connect.client_id != cn:
        return f"client id {connect.client_id!r} is not the certificate's CN {cn!r}"
    parts = (connect.username or "").split("/", 2)
    if len(parts) != 3 or parts[1] != cn or not parts[2].startswith("?api-version="):
        return (
            f"username {connect.username!r} is not '{{hub}}/{cn}/?api-version=...' "
            "for the certificate's identity"
        )
    if connect.will_topic is not None:
        why = judge_publish(cn, connect.will_topic, (connect.flags >> 3) & 3)
        if why:
            return f"will topic {connect.will_topic!r}: {why}"
    return None


def packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + encode_length(len(body)) + body


def inner_connect(cn: str, connect: Connect) -> bytes:
    """The CONNECT mosquitto gets: username = CN, no password, the will topic scoped."""
    flags = (connect.flags & 0x3E) | 0x80  # keep clean/will bits, username set, no password
    payload = encode_string(connect.client_id.encode())
    if connect.will_topic is not None:
        topic = (
            connect.will_topic if cn in SERVICE_IDENTITIES else inner_topic(cn, connect.will_topic)
        )
        payload += encode_string(topic.encode()) + encode_string(connect.will_message)
    payload += encode_string(cn.encode())
    body = (
        encode_string(b"MQTT") + bytes((4, flags)) + struct.pack("!H", connect.keepalive) + payload
    )
    return packet(CONNECT, body)


def split_packets(buf: bytearray) -> list[tuple[int, bytes, bytes]]:
    """Complete packets at the head of ``buf`` as (first byte, body, raw bytes); removed from
    ``buf``. Raises ValueError on a malformed remaining length."""
    out: list[tuple[int, bytes, bytes]] = []
    start = 0
    while len(buf) - start >= 2:
        found = decode_length(buf, start + 1)
        if found is None:
            break
        length, pos = found
        end = pos + length
        if len(buf) < end:
            break
        out.append((buf[start], bytes(buf[pos:end]), bytes(buf[start:end])))
        start = end
    del buf[:start]
    return out


def publish_topic(first: int, body: bytes) -> tuple[str, int]:
    (n,) = struct.unpack_from("!H", body)
    return body[2 : 2 + n].decode("utf-8", "replace"), (first >> 1) & 3


def rewrite_publish(first: int, body: bytes, topic: str) -> bytes:
    (n,) = struct.unpack_from("!H", body)
    return packet(first, encode_string(topic.encode()) + body[2 + n :])


def parse_filters(body: bytes, with_qos: bool) -> tuple[bytes, list[tuple[str, int]]]:
    """SUBSCRIBE/UNSUBSCRIBE body -> (packet id bytes, [(filter, qos)])."""
    pid, pos, out = body[:2], 2, []
    while pos < len(body):
        (n,) = struct.unpack_from("!H", body, pos)
        name = body[pos + 2 : pos + 2 + n].decode("utf-8", "replace")
        pos += 2 + n
        qos = 0
        if with_qos:
            qos = body[pos]
            pos += 1
        out.append((name, qos))
    return pid, out


# -- the relay -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Violation:
    """One refused connection or packet, as written to the broker log."""

    t: float
    identity: str
    what: str  # connect, publish, subscribe, unsubscribe, protocol
    topic: str
    why: str
    peer: str


def read_violations(log_path: Path) -> list[dict[str, object]]:
    """The violations a front wrote into ``log_path`` (the broker log)."""
    if not log_path.exists():
        return []
    out: list[dict[str, object]] = []
    for line in log_path.read_text(errors="replace").splitlines():
        _, mark, rest = line.partition(REFUSED_MARK)
        if mark:
            out.append(orjson.loads(rest))
    return out


class _Inner(asyncio.Protocol):
    """mosquitto's side of one relayed connection."""

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.conn.from_inner(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.close("the broker ended the connection")

    def pause_writing(self) -> None:
        self.conn.pause_outer()

    def resume_writing(self) -> None:
        self.conn.resume_outer()


class _Connection(asyncio.Protocol):
    """The device's (or service's) TLS side of one relayed connection."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.transport: asyncio.Transport | None = None
        self.inner: _Inner | None = None
        self.cn = ""  # no CN in the certificate: refused at CONNECT
        self.peer = "?"
        self.buf = bytearray()
        self.raw = False  # service identities: bytes pass unparsed after CONNECT
        self.connecting = False
        self.counted = False
        self.closed = False
        self.inner_buf = bytearray()
        self.inner_first = True

    # device -> front
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        cert = transport.get_extra_info("peercert") or {}
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    self.cn = value
        self.front.write_log(f"New connection from {self.peer} on port {self.front.port}.")
        self.front.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.raw:
            self._flush([data])
            return
        self.buf += data
        if not self.connecting:
            self._process()

    def _process(self) -> None:
        try:
            packets = split_packets(self.buf)
        except ValueError as err:
            self.refuse("protocol", "", str(err))
            return
        out: list[bytes] = []
        for i, (first, body, raw) in enumerate(packets):
            kind = first & 0xF0
            if self.inner is None:
                if kind != CONNECT:
                    self.refuse("protocol", "", "the first packet is not CONNECT")
                    return
                self._connect(body, packets[i + 1 :])
                return
            if kind == CONNECT:
                self.refuse("protocol", "", "a second CONNECT")
                return
            if self.raw:
                out.append(raw)
                continue
            if kind == PUBLISH:
                try:
                    topic, qos = publish_topic(first, body)
                except struct.error:
                    self.refuse("protocol", "", "malformed PUBLISH")
                    return
                why = judge_publish(self.cn, topic, qos)
                if why:
                    self._flush(out)
                    self.refuse("publish", topic, why)
                    return
                out.append(
                    rewrite_publish(first, body, inner_topic(self.cn, topic))
                    if topic.startswith(IOTHUB)
                    else raw
                )
            elif kind in (SUBSCRIBE, UNSUBSCRIBE):
                try:
                    pid, filters = parse_filters(body, kind == SUBSCRIBE)
                except (struct.error, IndexError):
                    self.refuse("protocol", "", "malformed SUBSCRIBE")
                    return
                rewritten = b""
                for name, qos in filters:
                    why = judge_subscribe(self.cn, name)
                    if why:
                        self._flush(out)
                        self.refuse("subscribe" if kind == SUBSCRIBE else "unsubscribe", name, why)
                        return
                    rewritten += encode_string(inner_topic(self.cn, name).encode())
                    if kind == SUBSCRIBE:
                        rewritten += bytes((min(qos, 1),))  # IoT Hub grants QoS 1 at most
                out.append(packet(first, pid + rewritten))
            else:
                out.append(raw)
        self._flush(out)

    def _flush(self, out: list[bytes]) -> None:
        inner = self.inner.transport if self.inner is not None else None
        # uvloop raises on a write to a closed transport, asyncio only warns.
        if out and inner is not None and not inner.is_closing():
            inner.write(b"".join(out))

    def _connect(self, body: bytes, rest: list[tuple[int, bytes, bytes]]) -> None:
        try:
            connect = parse_connect(body)
        except (ValueError, IndexError, struct.error) as err:
            self.refuse("connect", "", f"malformed CONNECT: {err}", connack=2)
            return
        sas = self.front.sas
        if not self.cn and sas is not None and connect.password is not None:
            # No certificate: a module identity with a SAS token (the edgeHub stand-in).
            identity, why = sas(connect)
            if why is not None or identity is None:
                self.cn = identity or ""
                self.refuse("connect", connect.client_id, why or "refused", connack=5)
                return
            self.cn = identity
        else:
            why = judge_connect(self.cn, connect)
        if why:
            self.refuse("connect", connect.client_id, why, connack=1 if connect.level != 4 else 5)
            return
        # What came after the CONNECT waits (unparsed) until mosquitto is reached.
        self.buf[:0] = b"".join(raw for _, _, raw in rest)
        self.connecting = True
        assert self.transport is not None
        self.transport.pause_reading()
        task = asyncio.ensure_future(self._open(inner_connect(self.cn, connect)))
        self.front.tasks.add(task)
        task.add_done_callback(self.front.tasks.discard)

    async def _open(self, connect: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, inner = await loop.create_unix_connection(
                lambda: _Inner(self), str(self.front.inner)
            )
        except OSError as err:
            log.warning("front: cannot reach the broker: %s", err)
            self.close("the broker is unreachable")
            return
        if self.closed:
            if inner.transport is not None:
                inner.transport.close()
            return
        self.inner = inner
        assert inner.transport is not None
        inner.transport.write(connect)
        self.raw = self.cn in SERVICE_IDENTITIES
        self.connecting = False
        if self.raw:
            if self.buf:
                inner.transport.write(bytes(self.buf))
                self.buf.clear()
        else:
            self._process()
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # mosquitto -> device
    def from_inner(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            return
        if self.raw and not self.inner_first:
            self.transport.write(data)
            return
        self.inner_buf += data
        try:
            packets = split_packets(self.inner_buf)
        except ValueError:
            self.close("malformed packet from the broker")
            return
        out: list[bytes] = []
        for first, body, raw in packets:
            kind = first & 0xF0
            if self.inner_first and kind == CONNACK:
                self.inner_first = False
                if len(body) >= 2 and body[1] == 0 and not self.raw:
                    self.counted = True
                    self.front.present(self.cn, +1)
            if kind == PUBLISH and not self.raw:
                topic, _ = publish_topic(first, body)
                if topic.startswith(IOTHUB):
                    outer = outer_topic(self.cn, topic)
                    if outer is None:  # the ACL keeps it from happening; never pass it on
                        log.warning("front: %s was sent %s; dropped", self.cn, topic)
                        continue
                    raw = rewrite_publish(first, body, outer)
            out.append(raw)
        if self.raw and not self.inner_first and self.inner_buf:
            out.append(bytes(self.inner_buf))
            self.inner_buf.clear()
        if out:
            self.transport.write(b"".join(out))

    def pause_outer(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_outer(self) -> None:
        if self.transport is not None and not self.connecting:
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        if self.inner is not None and self.inner.transport is not None:
            self.inner.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.inner is not None and self.inner.transport is not None:
            self.inner.transport.resume_reading()

    # ending
    def refuse(self, what: str, topic: str, why: str, connack: int | None = None) -> None:
        self.front.violation(Violation(time.time(), self.cn, what, topic, why, self.peer))
        if connack is not None and self.transport is not None:
            self.transport.write(packet(CONNACK, bytes((0, connack))))
        self.close(f"refused {what}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.close("the client ended the connection")

    def close(self, why: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.front.connections.discard(self)
        if self.counted:
            self.front.present(self.cn, -1)
        if self.transport is not None:
            self.transport.close()
        if self.inner is not None and self.inner.transport is not None:
            self.inner.transport.close()
        log.debug("front: %s (%s) closed: %s", self.cn, self.peer, why)


class _Tls(asyncio.Protocol):
    """TLS on a plain TCP connection with ``ssl.SSLObject``, for one reason: asyncio's own TLS
    server aborts a failed handshake without sending OpenSSL's alert, so a TLS 1.1 client saw a
    reset instead of IoT Hub's (and mosquitto's) "protocol version" alert. Here the alert is
    flushed before the close, and the refusal is recorded."""

    def __init__(self, front: Front, app: _Connection) -> None:
        self.front = front
        self.app = app
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.sslobj = front.context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.tcp: asyncio.Transport | None = None
        self.ready = False
        self.closing = False
        self.peer = "?"

    # the transport face the relay sees
    def write(self, data: bytes) -> None:
        if self.tcp is None or self.closing:
            return
        self.sslobj.write(data)
        self._flush()

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        if self.tcp is not None:
            if self.ready:
                try:
                    self.sslobj.unwrap()
                except ssl.SSLError:
                    pass
            self._flush()
            self.tcp.close()

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        if self.tcp is not None and not self.tcp.is_closing():
            self.tcp.pause_reading()

    def resume_reading(self) -> None:
        if self.tcp is not None and not self.tcp.is_closing():
            self.tcp.resume_reading()

    def get_extra_info(self, name: str, default: object = None) -> object:
        if name == "peercert":
            return self.sslobj.getpeercert()
        if name == "cipher":
            return self.sslobj.cipher()
        return self.tcp.get_extra_info(name, default) if self.tcp is not None else default

    # the TCP side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tcp = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data and self.tcp is not None and not self.tcp.is_closing():
            self.tcp.write(data)

    def data_received(self, data: bytes) -> None:
        self.incoming.write(data)
        if not self.ready:
            try:
                self.sslobj.do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                self._flush()
                return
            except ssl.SSLError as err:
                self.front.violation(
                    Violation(time.time(), "?", "tls", "", err.reason or str(err), self.peer)
                )
                self.close()  # flushes the alert OpenSSL wrote
                return
            self._flush()
            self.ready = True
            self.app.connection_made(cast(asyncio.BaseTransport, self))
        chunks = []
        while True:
            try:
                chunk = self.sslobj.read(65536)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except ssl.SSLError:
                self.close()
                break
            if not chunk:  # close_notify
                self.close()
                break
            chunks.append(chunk)
        self._flush()
        if chunks:
            self.app.data_received(b"".join(chunks))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.ready:
            self.app.connection_lost(exc)

    def pause_writing(self) -> None:
        self.app.pause_writing()

    def resume_writing(self) -> None:
        self.app.resume_writing()


def server_context(
    root: Path, cert: Path, key_pem: bytes, secret_dir: Path, *, certificate_optional: bool = False
) -> ssl.SSLContext:
    """The hub's TLS rules: 1.2 or newer, AEAD suites, a client certificate from the PKI root
    (``certificate_optional``: one given must verify, but a module with a SAS token has none)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_VERSION
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.verify_mode = ssl.CERT_OPTIONAL if certificate_optional else ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(root))
    # load_cert_chain reads files only: the decrypted key sits next to the broker's copy.
    key_file = secret_dir / "front.key"
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key_pem)
    try:
        ctx.load_cert_chain(str(cert), str(key_file))
    finally:
        key_file.unlink()
    return ctx


class Front:
    """The TLS listener on the public port, relaying to mosquitto's unix socket ``inner``."""

    def __init__(
        self,
        context: ssl.SSLContext,
        *,
        host: str,
        port: int,
        inner: Path,
        log_file: IO[str] | None,
        sas: SasCheck | None = None,
    ) -> None:
        self.context = context
        # The edgeHub stand-in's module check (None: certificates only, as IoT Hub here).
        self.sas = sas
        self.host = host
        self.port = port
        self.inner = inner
        self._log = log_file
        self.violations: list[Violation] = []
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.epoch = uuid.uuid4().hex
        self._present: dict[str, int] = {}
        self._server: asyncio.Server | None = None
        self._control: asyncio.Transport | None = None
        self.on_violation: Callable[[Violation], None] | None = None

    def write_log(self, text: str) -> None:
        if self._log is not None:
            self._log.write(f"{int(time.time())}: fieldgate-front: {text}\n")
            self._log.flush()

    def violation(self, v: Violation) -> None:
        self.violations.append(v)
        log.warning(
            "front: refused %s %r of %s (%s): %s", v.what, v.topic, v.identity, v.peer, v.why
        )
        if self._log is not None:
            self._log.write(f"{int(v.t)}: {REFUSED_MARK}{orjson.dumps(asdict(v)).decode()}\n")
            self._log.flush()
        if self.on_violation is not None:
            self.on_violation(v)

    def present(self, device: str, delta: int) -> None:
        before = self._present.get(device, 0)
        now = self._present[device] = max(0, before + delta)
        if (before == 0) != (now == 0):
            self._announce(presence_topic(device), {"epoch": self.epoch, "connected": now > 0})

    def _announce(self, topic: str, value: object) -> None:
        if self._control is not None and not self._control.is_closing():
            # QoS 0, retained: the latest state is what a service side joining later reads.
            self._control.write(
                packet(PUBLISH | 0x01, encode_string(topic.encode()) + orjson.dumps(value))
            )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        control, _ = await loop.create_unix_connection(asyncio.Protocol, str(self.inner))
        self._control = control
        body = encode_string(b"MQTT") + bytes((4, 0x82)) + struct.pack("!H", 0)
        control.write(
            packet(
                CONNECT,
                body + encode_string(FRONT_USER.encode()) + encode_string(FRONT_USER.encode()),
            )
        )
        self._announce(EPOCH, {"epoch": self.epoch})
        self._server = await loop.create_server(
            lambda: _Tls(self, _Connection(self)), self.host, self.port
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close("the stand-in stops")
        for task in list(self.tasks):
            task.cancel()
        if self._control is not None:
            if not self._control.is_closing():
                self._control.write(bytes((DISCONNECT, 0)))
                self._control.close()
            self._control = None
        if self._server is not None:
            try:
                async with asyncio.timeout(2):
                    await self._server.wait_closed()
            except TimeoutError:
                pass
            self._server = None
