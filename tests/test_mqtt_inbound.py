"""What the MQTT client does with what a broker sends: a QoS 1 message is acknowledged when its
handler is done (a command carried out), not at all when the handler failed, and a broker that
never answers a SUBSCRIBE is an uplink error, not an exception that escapes the session.

The broker here is a raw asyncio server on loopback that speaks just enough MQTT 3.1.1 to drive
each case and records every packet the client sends."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable

import pytest

from gateway.core.errors import UplinkError
from gateway.uplink.mqtt import MqttClient

CONNACK_OK = bytes((0x20, 2, 0, 0))


def publish_qos1(topic: str, pid: int, payload: bytes) -> bytes:
    body = struct.pack("!H", len(topic)) + topic.encode() + struct.pack("!H", pid) + payload
    return bytes((0x32, len(body))) + body


class RawBroker:
    """Answers CONNECT with CONNACK, then sends ``script`` and records what comes back."""

    def __init__(self, script: list[bytes]) -> None:
        self.script = script
        self.received: list[int] = []  # packet types (first byte) from the client
        self.pubacks: list[int] = []
        self.got = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> RawBroker:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                first = (await reader.readexactly(1))[0]
                length = (await reader.readexactly(1))[0]  # short packets only here
                body = await reader.readexactly(length)
                self.received.append(first)
                if first == 0x10:
                    writer.write(CONNACK_OK)
                    for packet in self.script:
                        writer.write(packet)
                elif first == 0x40:
                    self.pubacks.append(struct.unpack("!H", body)[0])
                    self.got.set()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


async def connected(
    port: int, handler: Callable[[str, bytes], Awaitable[None] | None]
) -> MqttClient:
    client = MqttClient(
        host="127.0.0.1",
        port=port,
        client_id="plc-1",
        ssl_context=None,
        connect_timeout=1.0,
        on_message=handler,
    )
    await client.__aenter__()
    return client


def test_a_qos1_message_is_acknowledged_when_its_handler_is_done() -> None:
    async def go() -> tuple[list[int], list[int]]:
        release = asyncio.Event()
        acked_before_release: list[int] = []

        async def carry_out() -> None:
            await release.wait()

        async with RawBroker([publish_qos1("devices/plc-1/messages/devicebound/", 7, b"{}")]) as b:
            client = await connected(b.port, lambda t, p: carry_out())
            await asyncio.sleep(0.2)
            acked_before_release.extend(b.pubacks)
            release.set()
            await asyncio.wait_for(b.got.wait(), 5)
            await client.disconnect()
            return acked_before_release, b.pubacks

    before, after = asyncio.run(go())
    assert before == [] and after == [7]


def test_a_message_whose_handler_failed_is_left_unacknowledged() -> None:
    async def go() -> list[int]:
        async def fails() -> None:
            raise OSError(28, "No space left on device")

        script = [
            publish_qos1("devices/plc-1/messages/devicebound/", 1, b"{}"),
            publish_qos1("devices/plc-1/messages/devicebound/", 2, b"{}"),
        ]
        calls = 0

        def handler(_topic: str, _payload: bytes) -> Awaitable[None]:
            nonlocal calls
            calls += 1

            async def fine() -> None:
                return None

            return fails() if calls == 1 else fine()

        async with RawBroker(script) as broker:
            client = await connected(broker.port, handler)
            await asyncio.wait_for(broker.got.wait(), 5)
            await asyncio.sleep(0.2)
            await client.disconnect()
            return broker.pubacks

    assert asyncio.run(go()) == [2]


def test_a_broker_that_never_answers_a_subscribe_is_an_uplink_error() -> None:
    async def go() -> None:
        async with RawBroker([]) as broker:
            client = await connected(broker.port, lambda t, p: None)
            try:
                with pytest.raises(UplinkError, match="no SUBACK within 1 s") as caught:
                    await client.subscribe([("$iothub/methods/POST/#", 0)])
                assert caught.value.cause == "timeout"
            finally:
                await client.disconnect()

    asyncio.run(go())
