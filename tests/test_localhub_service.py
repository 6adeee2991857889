"""The stand-in's service side against a running ``fieldgate localhub`` (a real process, its
front and mosquitto): direct methods, C2D, twins across a restart, and the ``fieldgate hub``
verbs as subprocesses."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import orjson
from test_localhub_front import device, receives, until

from gateway.core import iothub
from gateway.identity.pki import Pki
from gateway.testbed.localhub.control import HubControl, HubControlError
from gateway.uplink.mqtt import MqttClient

from conftest import Proc, fieldgate, start_hub


def responder(client: MqttClient, got: list[tuple[str, bytes]]) -> None:
    """A device that answers ``echo`` with its payload and ignores ``sleep``."""

    def on_message(topic: str, body: bytes) -> None:
        got.append((topic, body))
        request = iothub.parse_method_request(topic)
        if request is not None and request[0] == "echo":
            client.publish(iothub.method_response_topic(201, request[1]), body)

    client._on_message = on_message


def test_methods_c2d_and_their_hub_statuses(
    procs: list[Proc], tmp_path: Path, pki_dir: Path
) -> None:
    port, _ = start_hub(procs, tmp_path, pki_dir)
    pki = Pki(pki_dir)

    async def scenario() -> dict[str, Any]:
        got: list[tuple[str, bytes]] = []
        out: dict[str, Any] = {}
        async with HubControl(pki, "127.0.0.1", port, timeout=5) as hub:
            out["offline"] = await hub.invoke("plc-1", "echo", {"a": 1}, timeout=2)
            async with device(pki, "plc-1", port) as plc:
                responder(plc, got)
                await plc.subscribe(receives("plc-1"))
                await until(lambda: hub.connected("plc-1"), "plc-1 present")
                out["echo"] = await hub.invoke("plc-1", "echo", {"a": 1}, timeout=5)
                out["silent"] = await hub.invoke("plc-1", "sleep", None, timeout=0.5)
                first = await hub.c2d("plc-1", {"write": {"point": "sp", "value": 1}})
                again = await hub.c2d("plc-1", {"write": {"point": "sp", "value": 1}}, first)
                out["mids"] = [first, again]
                await until(lambda: len(got) >= 4, "two C2D messages")
            await until(lambda: not hub.connected("plc-1"), "plc-1 gone")
            out["gone"] = (await hub.invoke("plc-1", "echo", {}, timeout=2))[0]
        out["got"] = got
        return out

    out = asyncio.run(scenario())
    assert out["offline"][0] == 404 and "not connected" in out["offline"][1]["message"]
    assert out["echo"] == (201, {"a": 1})
    assert out["silent"][0] == 504
    assert out["gone"] == 404
    c2d = [(iothub.parse_c2d_topic(t), orjson.loads(b)) for t, b in out["got"][2:]]
    first, again = out["mids"]
    assert first == again
    # The same message id twice arrives twice: dedupe is the gateway's job.
    for (device_id, props), body in c2d:
        assert device_id == "plc-1"
        assert props[iothub.C2D_MESSAGE_ID] == first
        assert props["$.to"] == "/devices/plc-1/messages/devicebound"
        assert body == {"write": {"point": "sp", "value": 1}}
    assert len(c2d) == 2


def _device_twin_calls(pki: Pki, port: int) -> dict[str, Any]:
    """A device reads its twin, patches reported (null deletes) and sees a desired patch."""

    async def scenario() -> dict[str, Any]:
        got: list[tuple[str, bytes]] = []
        out: dict[str, Any] = {}
        async with HubControl(pki, "127.0.0.1", port, timeout=5) as hub:
            async with device(pki, "plc-2", port, got) as plc:
                await plc.subscribe(receives("plc-2"))
                plc.publish(iothub.twin_reported_topic("p1"), b'{"fw": "1.0", "temp": 3}')
                await until(lambda: len(got) >= 1, "reported answer")
                plc.publish(iothub.twin_reported_topic("p2"), b'{"temp": null}')
                await until(lambda: len(got) >= 2, "reported answer")
                out["twin"] = await hub.desire("plc-2", {"points": {"sp": 5}})
                await until(lambda: len(got) >= 3, "desired patch")
                plc.publish(iothub.twin_get_topic("g1"), b"")
                await until(lambda: len(got) >= 4, "twin GET answer")
                big = orjson.dumps({"blob": "x" * iothub.TWIN_SECTION_MAX})
                plc.publish(iothub.twin_reported_topic("p3"), big)
                await until(lambda: len(got) >= 5, "oversized answer")
                try:
                    await hub.desire("plc-2", {"blob": "x" * iothub.TWIN_SECTION_MAX})
                    out["big_desired"] = "accepted"
                except HubControlError as err:
                    out["big_desired"] = str(err)
        out["got"] = got
        return out

    return asyncio.run(scenario())


def test_twin_get_patches_versions_and_a_restart(
    procs: list[Proc], tmp_path: Path, pki_dir: Path
) -> None:
    port, _ = start_hub(procs, tmp_path, pki_dir)
    pki = Pki(pki_dir)
    out = _device_twin_calls(pki, port)
    topics = [t for t, _ in out["got"]]
    bodies = [b for _, b in out["got"]]
    assert topics[0] == iothub.twin_response_topic(204, "p1", 2)
    assert topics[1] == iothub.twin_response_topic(204, "p2", 3)
    assert topics[2] == iothub.desired_patch_topic(2)
    assert orjson.loads(bodies[2]) == {"points": {"sp": 5}, "$version": 2}
    assert topics[3] == iothub.twin_response_topic(200, "g1")
    expected = {
        "desired": {"points": {"sp": 5}, "$version": 2},
        "reported": {"fw": "1.0", "$version": 3},
    }
    assert orjson.loads(bodies[3]) == expected
    assert out["twin"] == expected
    assert topics[4] == iothub.twin_response_topic(400, "p3")
    assert "(400)" in out["big_desired"] and "over IoT Hub's" in out["big_desired"]

    # The twin is the stand-in's memory: a restart keeps it.
    procs.pop().stop()
    start_hub(procs, tmp_path, pki_dir, port=port)

    async def after() -> dict[str, Any]:
        async with HubControl(pki, "127.0.0.1", port, timeout=5) as hub:
            return await hub.twin("plc-2")

    assert asyncio.run(after()) == expected


def _hub(port: int, pki_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = fieldgate("hub", *args, "--pki", str(pki_dir), "--port", str(port))
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_the_hub_verbs_print_what_they_say(
    procs: list[Proc], tmp_path: Path, pki_dir: Path
) -> None:
    port, _ = start_hub(procs, tmp_path, pki_dir)
    pki = Pki(pki_dir)
    results: dict[str, subprocess.CompletedProcess[str]] = {}

    async def scenario() -> list[tuple[str, bytes]]:
        got: list[tuple[str, bytes]] = []
        async with HubControl(pki, "127.0.0.1", port, timeout=5) as hub:
            async with device(pki, "plc-3", port) as plc:
                responder(plc, got)
                await plc.subscribe(receives("plc-3"))
                await until(lambda: hub.connected("plc-3"), "plc-3 present")
                loop = asyncio.get_running_loop()
                for name, args in {
                    "invoke": ("invoke", "plc-3", "echo", "--payload", '{"x": 2}'),
                    "timeout": ("invoke", "plc-3", "sleep", "--timeout", "0.5"),
                    "offline": ("invoke", "plc-4", "echo"),
                    "c2d": ("c2d", "plc-3", '{"y": 1}', "--message-id", "m-7"),
                    "desired": ("twin", "plc-3", "--desired", '{"sp": 1}'),
                    "twin": ("twin", "plc-3"),
                    "bad": ("invoke", "plc-3", "echo", "--payload", "{not json"),
                }.items():
                    # The device answers in this loop while the verb runs in its own process.
                    results[name] = await loop.run_in_executor(None, _hub, port, pki_dir, *args)
                await until(lambda: len(got) >= 4, "the device's messages")
        return got

    got = asyncio.run(scenario())
    invoke = results["invoke"]
    assert invoke.returncode == 0, invoke.stderr
    status, _, body = invoke.stdout.partition("\n")
    assert status == "201" and orjson.loads(body) == {"x": 2}
    assert results["timeout"].returncode == 1
    assert results["timeout"].stdout.startswith("504\n")
    assert results["offline"].returncode == 1 and results["offline"].stdout.startswith("404\n")
    assert results["c2d"].returncode == 0
    assert orjson.loads(results["c2d"].stdout) == {"device": "plc-3", "message_id": "m-7"}
    desired = orjson.loads(results["desired"].stdout)
    assert desired["desired"] == {"sp": 1, "$version": 2}
    assert orjson.loads(results["twin"].stdout) == desired
    assert results["bad"].returncode == 2 and "--payload: not JSON" in results["bad"].stderr
    topics = [t for t, _ in got]
    assert any(t.startswith("devices/plc-3/messages/devicebound/") for t in topics)
    assert iothub.desired_patch_topic(2) in topics
