"""The stand-in against the SDK devices really use: two azure-iot-device clients, each on its
own identity, through the front. The SDK's port is fixed at 8883, so this stand-in gets its own
loopback address (127.0.0.N:8883) and a PKI whose server certificate names it."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
from test_localhub_front import until

from gateway.identity import pki as pki_mod
from gateway.testbed.localhub.broker import Broker
from gateway.testbed.localhub.control import HubControl, TwinHolder

azure = pytest.importorskip("azure.iot.device", reason="azure-iot-device is in the dev extra")

SDK_PORT = 8883
# The SDK's own TLS code (2.14) uses deprecated ssl constants and paho 1.x's API.
pytestmark = [
    pytest.mark.filterwarnings("ignore:ssl.PROTOCOL_TLS:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:paho"),
]


def _free_address() -> str:
    for n in range(20, 250):
        address = f"127.0.0.{n}"
        with socket.socket() as probe:
            try:
                probe.bind((address, SDK_PORT))
            except OSError:
                continue
            return address
    pytest.skip(f"no loopback address 127.0.0.N has port {SDK_PORT} free (the SDK needs it)")


class SdkDevice:
    """An IoTHubDeviceClient that echoes methods and keeps what it receives."""

    def __init__(self, pki: pki_mod.Pki, device_id: str, address: str) -> None:
        from azure.iot.device import X509, IoTHubDeviceClient, MethodResponse

        self.methods: list[tuple[str, Any]] = []
        self.c2d: list[tuple[str | None, bytes]] = []
        self.desired: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.client = IoTHubDeviceClient.create_from_x509_certificate(
            x509=X509(
                str(pki.device_cert(device_id)),
                str(pki.device_key(device_id)),
                pass_phrase=pki.passphrase().decode(),
            ),
            hostname="localhost",
            device_id=device_id,
            gateway_hostname=address,
            server_verification_cert=pki.root_cert.read_text(),
        )

        def on_method(request: Any) -> None:
            with self.lock:
                self.methods.append((request.name, request.payload))
            response = MethodResponse.create_from_method_request(request, 200, request.payload)
            self.client.send_method_response(response)

        def on_message(message: Any) -> None:
            with self.lock:
                self.c2d.append((message.message_id, message.data))

        def on_desired(patch: dict[str, Any]) -> None:
            with self.lock:
                self.desired.append(patch)

        self.client.connect()
        self.client.on_method_request_received = on_method
        self.client.on_message_received = on_message
        self.client.on_twin_desired_properties_patch_received = on_desired

    def close(self) -> None:
        self.client.shutdown()


def test_sdk_devices_get_only_their_own_methods_c2d_and_twin(tmp_path: Path) -> None:
    address = _free_address()
    pki = pki_mod.init(tmp_path / "pki", server_ips=("127.0.0.1", address))
    pki_mod.issue(tmp_path / "pki", ["sdk-1", "sdk-2"])

    async def scenario() -> dict[str, Any]:
        stop = asyncio.Event()
        out: dict[str, Any] = {}
        loop = asyncio.get_running_loop()
        async with Broker(pki, host=address, port=SDK_PORT) as broker:
            holder = TwinHolder(pki, host=address, port=SDK_PORT, path=tmp_path / "twins.json")
            task = asyncio.create_task(holder.run(stop))
            await asyncio.wait_for(holder.connected.wait(), 5)
            one = two = None
            try:
                one = await loop.run_in_executor(None, SdkDevice, pki, "sdk-1", address)
                two = await loop.run_in_executor(None, SdkDevice, pki, "sdk-2", address)
                async with HubControl(pki, address, SDK_PORT, timeout=10) as hub:
                    await until(lambda: hub.connected("sdk-2"), "sdk-2 present")
                    out["invoke"] = await hub.invoke("sdk-2", "echo", {"n": 7}, timeout=10)
                    mid = await hub.c2d("sdk-2", {"write": 1})
                    await hub.c2d("sdk-2", {"write": 1}, message_id=mid)
                    out["mid"] = mid
                    await hub.desire("sdk-2", {"sp": 3})
                    twin = await loop.run_in_executor(None, two.client.get_twin)
                    out["twin"] = twin
                    await loop.run_in_executor(
                        None, two.client.patch_twin_reported_properties, {"fw": "2.0"}
                    )
                    out["after"] = await hub.twin("sdk-2")
                    await until(lambda: len(two.c2d) == 2 and two.desired, "sdk-2's messages")
                    # A marker to sdk-1 last: once it is in, anything meant for sdk-2 that
                    # leaked to sdk-1 would be in too.
                    await hub.c2d("sdk-1", {"marker": 1}, message_id="marker")
                    await until(lambda: one.c2d, "sdk-1's marker")
            finally:
                for sdk in (one, two):
                    if sdk is not None:
                        await loop.run_in_executor(None, sdk.close)
                stop.set()
                await task
            out["violations"] = list(broker.violations)
        assert one is not None and two is not None
        out["one"] = (one.methods, one.c2d, one.desired)
        out["two"] = (two.methods, two.c2d, two.desired)
        return out

    out = asyncio.run(scenario())
    assert out["invoke"] == (200, {"n": 7})
    methods, c2d, desired = out["two"]
    assert methods == [("echo", {"n": 7})]
    assert [m for m, _ in c2d] == [out["mid"], out["mid"]]  # a redelivery arrives again
    assert desired == [{"sp": 3, "$version": 2}]
    assert out["twin"]["desired"] == {"sp": 3, "$version": 2}
    assert out["after"]["reported"] == {"fw": "2.0", "$version": 2}
    assert out["one"] == ([], [("marker", b'{"marker":1}')], [])
    assert out["violations"] == []
