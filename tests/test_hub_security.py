"""The stand-in enforces IoT Hub's rules, and the uplink refuses a hub it cannot trust."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import warnings
from pathlib import Path

import pytest

from gateway.core.errors import UplinkError
from gateway.core.iothub import iothub_username
from gateway.identity import pki as pki_mod
from gateway.identity.pki import SERVICE_IDENTITY, Pki
from gateway.identity.tls import client_context
from gateway.testbed.localhub.broker import Broker
from gateway.uplink.mqtt import MqttClient

from conftest import free_ports


def _device(
    pki: Pki,
    device_id: str,
    port: int,
    *,
    ca: Path | None = None,
    server_hostname: str = "localhost",
) -> MqttClient:
    context = client_context(
        ca or pki.root_cert, pki.device_cert(device_id), pki.device_key(device_id), pki.passphrase()
    )
    return MqttClient(
        host="127.0.0.1",
        port=port,
        client_id=device_id,
        ssl_context=context,
        server_hostname=server_hostname,
        username=iothub_username("localhost", device_id),
        connect_timeout=5,
    )


def test_a_device_cannot_deliver_on_another_devices_topic(pki_dir: Path) -> None:
    pki = Pki(pki_dir)

    async def scenario() -> tuple[list[tuple[str, bytes]], list[str]]:
        port = free_ports(1)
        received: list[tuple[str, bytes]] = []
        own_arrived = asyncio.Event()

        def on_message(topic: str, body: bytes) -> None:
            received.append((topic, body))
            if body == b"own":
                own_arrived.set()

        service_ctx = client_context(
            pki.root_cert, pki.service_cert, pki.service_key, pki.passphrase()
        )
        async with (
            Broker(pki, port=port) as broker,
            MqttClient(
                host="127.0.0.1",
                port=port,
                client_id=SERVICE_IDENTITY,
                ssl_context=service_ctx,
                server_hostname="localhost",
                on_message=on_message,
            ) as service,
        ):
            assert await service.subscribe([("devices/+/messages/events/#", 1)]) == [1]
            async with _device(pki, "plc-1", port) as plc1:
                spoof = plc1.publish("devices/plc-2/messages/events/a=1", b"spoof")
                # As IoT Hub: no PUBACK, the connection is closed.
                with pytest.raises(UplinkError):
                    await asyncio.wait_for(spoof, 5)  # type: ignore[arg-type]
            async with _device(pki, "plc-1", port) as plc1:
                own = plc1.publish("devices/plc-1/messages/events/a=1", b"own")
                await asyncio.wait_for(own, 5)  # type: ignore[arg-type]
                await asyncio.wait_for(own_arrived.wait(), 5)
            refused = [f"{v.identity} {v.what} {v.topic}" for v in broker.violations]
        return received, refused

    received, refused = asyncio.run(scenario())
    assert received == [("devices/plc-1/messages/events/a=1", b"own")]
    assert refused == ["plc-1 publish devices/plc-2/messages/events/a=1"]


def test_uplink_refuses_a_hub_signed_by_an_unknown_ca(pki_dir: Path, tmp_path: Path) -> None:
    impostor = pki_mod.init(tmp_path / "impostor", root_name="someone else's root")

    async def scenario() -> None:
        port = free_ports(1)
        async with Broker(impostor, port=port):
            async with _device(Pki(pki_dir), "plc-1", port):
                pass

    with pytest.raises(UplinkError, match="server certificate refused"):
        asyncio.run(scenario())


def test_uplink_refuses_a_hub_whose_certificate_names_another_host(pki_dir: Path) -> None:
    async def scenario() -> None:
        port = free_ports(1)
        async with Broker(Pki(pki_dir), port=port):
            async with _device(Pki(pki_dir), "plc-1", port, server_hostname="myhub.example.net"):
                pass

    with pytest.raises(UplinkError, match="Hostname mismatch"):
        asyncio.run(scenario())


def _handshake(port: int, pki: Pki, *, tls_max: ssl.TLSVersion, with_cert: bool = True) -> str:
    """Connect with a raw TLS client; returns "ok" or the error text."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # Let this client offer old versions at all (OpenSSL 3 forbids them at level 2), so that
    # a refusal can only come from the broker.
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        # Offering a deprecated version is the point of this client.
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1_1
        context.maximum_version = tls_max
    context.load_verify_locations(str(pki.root_cert))
    if with_cert:
        context.load_cert_chain(
            str(pki.device_cert("plc-1")), str(pki.device_key("plc-1")), password=pki.passphrase()
        )

    async def attempt() -> str:
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname="localhost"
            )
        except (ssl.SSLError, OSError) as err:
            return str(err)
        try:
            # A real MQTT CONNECT; TLS 1.3 reports a refused client certificate only here.
            client_id = b"plc-1"
            user = iothub_username("localhost", "plc-1").encode()
            body = b"\x00\x04MQTT\x04\x82\x00\x3c" + len(client_id).to_bytes(2, "big") + client_id
            body += len(user).to_bytes(2, "big") + user
            writer.write(bytes((0x10, len(body))) + body)
            await writer.drain()
            data = await asyncio.wait_for(reader.read(4), 5)
            return "ok" if data == b"\x20\x02\x00\x00" else f"closed ({data!r})"
        except (ssl.SSLError, OSError) as err:
            return str(err)
        finally:
            writer.close()
            # Waited for, or a refused connection's socket may outlive the loop and be
            # reported as unclosed in whichever test runs next.
            with contextlib.suppress(ssl.SSLError, OSError):
                await writer.wait_closed()

    return asyncio.run(attempt())


def test_stand_in_refuses_tls_1_1_and_clients_without_a_certificate(pki_dir: Path) -> None:
    pki = Pki(pki_dir)
    port = free_ports(1)

    async def serve(stop: asyncio.Event, ready: asyncio.Event) -> None:
        async with Broker(pki, port=port):
            ready.set()
            await stop.wait()

    loop = asyncio.new_event_loop()
    stop, ready = asyncio.Event(), asyncio.Event()
    thread = threading.Thread(target=loop.run_until_complete, args=(serve(stop, ready),))
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(ready.wait(), loop).result(10)
        old = _handshake(port, pki, tls_max=ssl.TLSVersion.TLSv1_1)
        assert "PROTOCOL_VERSION" in old.upper(), old
        assert _handshake(port, pki, tls_max=ssl.TLSVersion.TLSv1_2) == "ok"
        no_cert = _handshake(port, pki, tls_max=ssl.TLSVersion.TLSv1_3, with_cert=False)
        assert no_cert != "ok"
        # The broker ends the handshake with an alert, or resets the socket; either way no
        # CONNACK, while the same client with a certificate (above) gets one.
        refused = ("CERTIFICATE", "RESET", "CLOSED", "EOF")
        assert any(word in no_cert.upper() for word in refused), no_cert
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()
