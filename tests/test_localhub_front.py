"""The stand-in's TLS front: per-identity ``$iothub`` scoping and IoT Hub's disconnect on a
publish or subscribe outside the identity, against the real front, mosquitto and the project's
own MQTT client (no mocks)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from gateway.core import iothub
from gateway.core.errors import UplinkError
from gateway.identity.pki import Pki
from gateway.identity.tls import client_context
from gateway.testbed.localhub.broker import Broker
from gateway.testbed.localhub.control import HubControl, TwinHolder
from gateway.testbed.localhub.front import read_violations
from gateway.testbed.localhub.service import HubService
from gateway.uplink.mqtt import MqttClient

from conftest import free_ports


def device(
    pki: Pki,
    device_id: str,
    port: int,
    got: list[tuple[str, bytes]] | None = None,
    *,
    client_id: str | None = None,
    username: str | None = None,
    cert_of: str | None = None,
) -> MqttClient:
    """A device's own connection as the gateway's uplink makes it (client id = device id,
    IoT Hub's username), recording what it receives in ``got``."""
    who = cert_of or device_id
    context = client_context(
        pki.root_cert, pki.device_cert(who), pki.device_key(who), pki.passphrase()
    )
    return MqttClient(
        host="127.0.0.1",
        port=port,
        client_id=client_id or device_id,
        ssl_context=context,
        server_hostname="localhost",
        username=username if username is not None else iothub_user(device_id),
        connect_timeout=5,
        on_message=(lambda t, b: got.append((t, b))) if got is not None else None,
    )


def iothub_user(device_id: str) -> str:
    return iothub.iothub_username("localhost", device_id)


def receives(device_id: str) -> list[tuple[str, int]]:
    return [(t.format(device=device_id), 1) for t in iothub.DEVICE_RECEIVES]


@asynccontextmanager
async def stand_in(pki: Pki, tmp: Path) -> AsyncIterator[tuple[Broker, HubControl, Path]]:
    """The front + mosquitto, the twin holder and the telemetry recorder, in this loop."""
    port = free_ports(1)
    log = tmp / "broker.log"
    record = tmp / "record.jsonl"
    stop = asyncio.Event()
    async with Broker(pki, port=port, log_path=log) as broker:
        holder = TwinHolder(pki, host="127.0.0.1", port=port, path=tmp / "twins.json")
        service = HubService(pki, host="127.0.0.1", port=port, record=record)
        tasks = [asyncio.create_task(holder.run(stop)), asyncio.create_task(service.run(stop))]
        await asyncio.wait_for(holder.connected.wait(), 5)
        await asyncio.wait_for(service.connected.wait(), 5)
        try:
            async with HubControl(pki, "127.0.0.1", port, broker_log=log, timeout=5) as hub:
                yield broker, hub, record
        finally:
            stop.set()
            await asyncio.gather(*tasks)
            service.close()


async def until(predicate: Any, what: str, within: float = 5) -> None:
    """Poll the state another connection changes (no event of ours to wait on)."""
    for _ in range(int(within / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_device_never_sees_another_devices_methods_twin_or_c2d(
    pki_dir: Path, tmp_path: Path
) -> None:
    pki = Pki(pki_dir)

    async def scenario() -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]], Any]:
        got_a: list[tuple[str, bytes]] = []
        got_b: list[tuple[str, bytes]] = []
        async with stand_in(pki, tmp_path) as (broker, hub, _):
            async with device(pki, "plc-1", broker.port, got_a) as a:
                async with device(pki, "plc-2", broker.port, got_b) as b:
                    assert await a.subscribe(receives("plc-1")) == [1, 1, 1, 1]
                    assert await b.subscribe(receives("plc-2")) == [1, 1, 1, 1]

                    def answer(topic: str, body: bytes) -> None:
                        got_b.append((topic, body))
                        request = iothub.parse_method_request(topic)
                        if request is not None:
                            b.publish(iothub.method_response_topic(200, request[1]), body)

                    b._on_message = answer
                    await until(lambda: hub.connected("plc-2"), "plc-2 is present")
                    answered = await hub.invoke("plc-2", "echo", {"n": 1}, timeout=5)
                    await hub.c2d("plc-2", {"write": 1}, message_id="m-1")
                    await hub.desire("plc-2", {"points": {"sp": 5}})
                    b.publish(iothub.twin_get_topic("r1"), b"")
                    await until(lambda: len(got_b) >= 4, "plc-2 got its four messages")
                    # Sent after everything above on the same broker: once it is in, what
                    # plc-1 would have got from the above is in too.
                    await hub.c2d("plc-1", {"marker": True}, message_id="marker")
                    await until(lambda: got_a, "plc-1's own C2D arrived")
        return got_a, got_b, answered

    got_a, got_b, answered = asyncio.run(scenario())
    assert answered == (200, {"n": 1})
    assert [iothub.parse_c2d_topic(t)[1][iothub.C2D_MESSAGE_ID] for t, _ in got_a] == ["marker"]
    topics = [t for t, _ in got_b]
    # plc-2 sees its own $iothub topics in IoT Hub's form (no device id in them).
    assert topics[0].startswith("$iothub/methods/POST/echo/?$rid=")
    assert topics[1].startswith("devices/plc-2/messages/devicebound/")
    assert topics[2] == iothub.desired_patch_topic(2)
    assert topics[3] == iothub.twin_response_topic(200, "r1")


CASES = [
    # (what the device does, the refused topic)
    ("publish", "devices/plc-2/messages/events/a=1"),  # another device's telemetry
    ("publish", "devices/plc-1/messages/devicebound/x"),  # outside its publish set
    ("publish", "$iothub/methods/POST/reboot/?$rid=1"),  # a method call, as if from the hub
    ("publish", "fieldgate-hub/twin/req/x/1"),  # the stand-in's own control topic
    ("subscribe", "devices/plc-2/messages/devicebound/#"),
    ("subscribe", "devices/+/messages/events/#"),
    ("subscribe", "$iothub/#"),
    ("subscribe", "#"),
]


def test_a_publish_or_subscribe_outside_the_identity_closes_the_connection(
    pki_dir: Path, tmp_path: Path
) -> None:
    pki = Pki(pki_dir)

    async def scenario() -> tuple[list[str], list[tuple[str, bytes]], list[str], list[Any]]:
        outcomes: list[str] = []
        seen: list[tuple[str, bytes]] = []
        async with stand_in(pki, tmp_path) as (broker, hub, record):
            # A service-side subscriber to everything, $iothub included.
            watcher = hub.client
            watcher._on_message = lambda t, b: seen.append((t, b))
            assert await watcher.subscribe([("#", 1), ("$iothub/#", 1)]) == [1, 1]
            async with device(pki, "plc-2", broker.port) as b:
                assert await b.subscribe(receives("plc-2")) == [1, 1, 1, 1]
                for what, topic in CASES:
                    async with device(pki, "plc-1", broker.port) as a:
                        try:
                            if what == "publish":
                                sent = a.publish(topic, b"forbidden")
                                assert sent is not None
                                await asyncio.wait_for(sent, 5)
                            else:
                                await a.subscribe([(topic, 1)])
                            outcomes.append(f"{what} {topic}: acknowledged")
                        except UplinkError:
                            outcomes.append(f"{what} {topic}: closed")
                        await asyncio.wait([a.closed], timeout=5)
                # The device's own telemetry still flows, and is the only thing recorded.
                async with device(pki, "plc-1", broker.port) as a:
                    sent = a.publish("devices/plc-1/messages/events/a=1", b"own")
                    assert sent is not None
                    await asyncio.wait_for(sent, 5)
                await until(lambda: b"own" in [body for _, body in seen], "own telemetry")
            refused = [f"{v.what} {v.topic}" for v in broker.violations]
        recorded = [line for line in record.read_text().splitlines() if line]
        return (
            outcomes,
            seen,
            [*refused, f"{len(recorded)} recorded"],
            read_violations(tmp_path / "broker.log"),
        )

    outcomes, seen, refused, logged = asyncio.run(scenario())
    assert outcomes == [f"{what} {topic}: closed" for what, topic in CASES]
    assert refused == [f"{what} {topic}" for what, topic in CASES] + ["1 recorded"]
    assert [(v["identity"], v["what"], v["topic"]) for v in logged] == [
        ("plc-1", what, topic) for what, topic in CASES
    ]
    assert all(body != b"forbidden" for _, body in seen), seen
    assert [t for t, _ in seen if not t.startswith("fieldgate-hub/")] == [
        "devices/plc-1/messages/events/a=1"
    ]


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"client_id": "plc-2"}, "client id 'plc-2' is not the certificate's CN 'plc-1'"),
        ({"username": "localhost/plc-2/?api-version=x"}, "username"),
        ({"username": ""}, "username"),
        ({"cert_of": "plc-2"}, "client id 'plc-1' is not the certificate's CN 'plc-2'"),
    ],
)
def test_a_connect_not_matching_the_certificate_is_refused_with_connack_5(
    pki_dir: Path, tmp_path: Path, change: dict[str, str], why: str
) -> None:
    """The reliability issue's case: a device whose certificate is another's is refused at
    CONNECT, not accepted and its readings silently dropped."""
    pki = Pki(pki_dir)

    async def scenario() -> list[Any]:
        port = free_ports(1)
        async with Broker(pki, port=port, log_path=tmp_path / "broker.log") as broker:
            with pytest.raises(UplinkError) as refused:
                async with device(pki, "plc-1", port, **change):
                    pass
            assert refused.value.connack == 5, refused.value
            return list(broker.violations)

    violations = asyncio.run(scenario())
    assert [v.what for v in violations] == ["connect"]
    assert why in violations[0].why


def test_the_front_refuses_a_cbc_only_client(pki_dir: Path) -> None:
    pki = Pki(pki_dir)

    async def scenario() -> str:
        port = free_ports(1)
        async with Broker(pki, port=port) as broker:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.maximum_version = ssl.TLSVersion.TLSv1_2
            context.set_ciphers("ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA")
            context.load_verify_locations(str(pki.root_cert))
            context.load_cert_chain(
                str(pki.device_cert("plc-1")),
                str(pki.device_key("plc-1")),
                password=pki.passphrase(),
            )
            try:
                _, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=context, server_hostname="localhost"
                )
            except (ssl.SSLError, OSError) as err:
                assert [v.what for v in broker.violations] == ["tls"]
                return str(err)
            writer.close()
            return "ok"

    refused = asyncio.run(scenario())
    assert "HANDSHAKE_FAILURE" in refused.upper() or "NO_SHARED_CIPHER" in refused.upper(), refused
