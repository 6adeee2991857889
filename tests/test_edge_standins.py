"""azure-iot-device's own module client against the edge stand-ins: the workload API signs its
SAS token and hands it the trust bundle, edgeHub checks the token (key, expiry, resource) and
serves the module's twin and methods beside the device identities."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_localhub_front import until

from gateway.identity import pki as pki_mod
from gateway.testbed.edge.hub import EDGE_PORT, EdgeHub, module_environment
from gateway.testbed.edge.sas import Module
from gateway.testbed.edge.workload import WorkloadApi
from gateway.testbed.localhub.control import HubControl

azure = pytest.importorskip("azure.iot.device", reason="azure-iot-device is in the edge extra")

pytestmark = [
    pytest.mark.filterwarnings("ignore:ssl.PROTOCOL_TLS:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:paho"),
]

HUB = "myhub.azure-devices.net"
EDGE_DEVICE = "edge-1"


def free_edge_address() -> str:
    """A loopback address with edgeHub's port free (the SDK cannot use another port)."""
    for n in range(20, 250):
        address = f"127.0.0.{n}"
        with socket.socket() as probe:
            try:
                probe.bind((address, EDGE_PORT))
            except OSError:
                continue
            return address
    pytest.skip(f"no loopback address 127.0.0.N has port {EDGE_PORT} free")


@pytest.fixture
def edge_pki(tmp_path: Path) -> Iterator[tuple[pki_mod.Pki, str]]:
    address = free_edge_address()
    yield pki_mod.init(tmp_path / "pki", server_ips=("127.0.0.1", address)), address


def _module_client(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    from azure.iot.device import IoTHubModuleClient

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return IoTHubModuleClient.create_from_edge_environment(connection_retry=False)


def test_the_sdk_module_client_connects_by_a_workload_signed_token_and_uses_its_twin(
    edge_pki: tuple[pki_mod.Pki, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pki, address = edge_pki
    module = Module(EDGE_DEVICE, "fieldgate")

    async def scenario() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        out: dict[str, Any] = {}
        root = pki.root_cert.read_text()
        async with (
            WorkloadApi(tmp_path / "workload.sock", module, root) as workload,
            EdgeHub(
                pki, address=address, hub=HUB, modules=[module], state=tmp_path / "hub"
            ) as edge,
        ):
            env = module_environment(workload, hub=HUB, gateway_host=address, device=EDGE_DEVICE)
            client = await loop.run_in_executor(None, _module_client, env, monkeypatch)
            desired: list[dict[str, Any]] = []

            def connect() -> None:
                # Setting a handler subscribes at once, blocking: never on the loop's thread
                # (the stand-in's front runs there).
                client.connect()
                client.on_twin_desired_properties_patch_received = desired.append

            try:
                await loop.run_in_executor(None, connect)
                async with HubControl(pki, address, EDGE_PORT) as hub:
                    await until(lambda: hub.connected(module.identity), "the module present")
                    await hub.desire(module.identity, {"fieldgate": {"n": 1}})
                    out["twin"] = await loop.run_in_executor(None, client.get_twin)
                    await loop.run_in_executor(
                        None, client.patch_twin_reported_properties, {"state": "up"}
                    )
                    out["held"] = await hub.twin(module.identity)
                    await until(lambda: desired, "the desired patch")
            finally:
                await loop.run_in_executor(None, client.shutdown)
            out["desired"] = desired
            out["signed"] = workload.calls.signed
            out["bundles"] = workload.calls.bundles
            out["violations"] = list(edge.broker.violations)
        return out

    out = asyncio.run(scenario())
    assert out["signed"] >= 1 and out["bundles"] == 1
    assert out["twin"]["desired"] == {"fieldgate": {"n": 1}, "$version": 2}
    assert out["held"]["reported"] == {"state": "up", "$version": 2}
    assert out["desired"] == [{"fieldgate": {"n": 1}, "$version": 2}]
    assert out["violations"] == []


@pytest.mark.parametrize(
    ("case", "why"),
    [
        ("wrong key", "signature does not match the module's key"),
        ("expired", "SAS token expired"),
    ],
)
def test_a_wrong_or_expired_token_gets_connack_5_and_a_recorded_refusal(
    edge_pki: tuple[pki_mod.Pki, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
    why: str,
) -> None:
    from azure.iot.device.exceptions import ClientError, CredentialError

    pki, address = edge_pki
    module = Module(EDGE_DEVICE, "fieldgate")
    # The workload API signs with another key than edgeHub knows; or edgeHub's clock is two
    # hours on, past the SDK's one-hour token.
    signer = Module(EDGE_DEVICE, "fieldgate", generation_id=module.generation_id)
    skew = 7200.0 if case == "expired" else 0.0

    async def scenario() -> tuple[BaseException | None, list[Any], bool]:
        loop = asyncio.get_running_loop()
        root = pki.root_cert.read_text()
        workload_module = signer if case == "wrong key" else module
        async with (
            WorkloadApi(tmp_path / "workload.sock", workload_module, root) as workload,
            EdgeHub(
                pki,
                address=address,
                hub=HUB,
                modules=[module],
                state=tmp_path / "hub",
                clock=lambda: time.time() + skew,
            ) as edge,
        ):
            env = module_environment(workload, hub=HUB, gateway_host=address, device=EDGE_DEVICE)
            client = await loop.run_in_executor(None, _module_client, env, monkeypatch)
            error: BaseException | None = None
            try:
                await loop.run_in_executor(None, client.connect)
            except (ClientError, CredentialError) as err:
                error = err
            finally:
                await loop.run_in_executor(None, client.shutdown)
            async with HubControl(pki, address, EDGE_PORT) as hub:
                present = hub.connected(module.identity)
            return error, list(edge.broker.violations), present

    error, violations, present = asyncio.run(scenario())
    assert error is not None, "the SDK connected with a bad token"
    # paho's words for CONNACK 5, under the SDK's CredentialError
    assert isinstance(error, CredentialError)
    assert "not authorised" in str(error.__cause__)
    assert not present
    assert [(v.what, v.identity) for v in violations] == [("connect", "edge-1/modules/fieldgate")]
    assert why in violations[0].why


def test_the_workload_api_signs_only_for_its_module_and_generation() -> None:
    import base64

    from gateway.testbed.edge.sas import sign
    from gateway.testbed.edge.workload import Calls, answer

    module = Module(EDGE_DEVICE, "fieldgate")
    calls = Calls()
    body = b'{"keyId": "primary", "algo": "HMACSHA256", "data": "' + base64.b64encode(b"x") + b'"}'

    def ask(method: str, target: str, data: bytes = b"") -> tuple[int, Any]:
        return answer(
            method, target, data, module=module, api_version="2019-01-30", bundle="PEM", calls=calls
        )

    own = f"/modules/fieldgate/genid/{module.generation_id}/sign?api-version=2019-01-30"
    assert ask("POST", own, body) == (200, {"digest": sign(module.key, b"x")})
    assert ask("GET", "/trust-bundle?api-version=2019-01-30") == (200, {"certificate": "PEM"})
    assert ask("POST", "/modules/fieldgate/genid/0000/sign?api-version=2019-01-30", body)[0] == 404
    assert (
        ask(
            "POST", f"/modules/other/genid/{module.generation_id}/sign?api-version=2019-01-30", body
        )[0]
        == 404
    )
    assert ask("POST", own.replace("2019-01-30", "2018-06-28"), body)[0] == 400
    assert ask("POST", own, b'{"keyId": "primary"}')[0] == 400
    assert ask("GET", "/modules?api-version=2019-01-30")[0] == 404
    assert (calls.signed, calls.bundles, len(calls.refused)) == (1, 1, 5)


def test_a_token_for_another_resource_or_username_is_refused() -> None:
    from gateway.testbed.edge.sas import judge_module_connect, token
    from gateway.testbed.localhub.front import Connect

    module = Module(EDGE_DEVICE, "fieldgate")
    modules = {"edge-1/fieldgate": module}
    now = time.time()
    good = token(module.key, module.resource(HUB), int(now) + 60).encode()

    def connect(client_id: str, username: str, password: bytes) -> tuple[str | None, str | None]:
        frame = Connect(4, 0xC2, 60, client_id, None, b"", username, password)
        return judge_module_connect(frame, modules, HUB, now)

    user = f"{HUB}/edge-1/fieldgate/?api-version=2021-04-12"
    assert connect("edge-1/fieldgate", user, good) == ("edge-1/modules/fieldgate", None)
    other = token(module.key, f"{HUB}/devices/edge-1", int(now) + 60).encode()
    assert "not 'myhub" in (connect("edge-1/fieldgate", user, other)[1] or "")
    assert "username" in (
        connect("edge-1/fieldgate", f"{HUB}/edge-1/?api-version=1", good)[1] or ""
    )
    assert "no module identity" in (connect("edge-1/other", user, good)[1] or "")
    assert "not a SharedAccessSignature" in (connect("edge-1/fieldgate", user, b"secret")[1] or "")


def test_a_module_identity_is_scoped_like_a_device() -> None:
    from gateway.testbed.localhub.control import _device_of
    from gateway.testbed.localhub.front import inner_topic, judge_publish, outer_topic

    me = "edge-1/modules/fieldgate"
    assert judge_publish(me, "devices/edge-1/modules/fieldgate/messages/events/a=1", 1) is None
    assert judge_publish(me, "devices/edge-1/messages/events/", 1) is not None  # its device's
    assert judge_publish(me, "devices/plc-1/messages/events/", 1) is not None  # a child's
    inner = inner_topic(me, "$iothub/twin/GET/?$rid=1")
    assert inner == "$iothub/edge-1/modules/fieldgate/twin/GET/?$rid=1"
    assert _device_of(inner) == (me, "$iothub/twin/GET/?$rid=1")
    assert _device_of("$iothub/edge-1/twin/GET/?$rid=1") == ("edge-1", "$iothub/twin/GET/?$rid=1")
    assert outer_topic("edge-1", inner) is None  # the device never sees its module's answers
