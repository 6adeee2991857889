"""The stand-in's service side for the cloud-to-device direction: direct methods, C2D
messages and device twins, as IoT Hub's service API offers them.

Two parts, because the twin must be answered while no tool runs:

- :class:`TwinHolder` runs inside ``fieldgate localhub``: it holds a twin per device (persisted
  in a JSON file, so it survives a restart), answers a device's ``$iothub/twin/GET`` and
  reported patches, and takes desired updates from tools over an internal topic
  (``fieldgate-hub/twin/req/...``), pushing each as a desired patch to the device.
- :class:`HubControl` is what tests and ``fieldgate hub`` use, from any process: ``invoke``
  (404 if the device is not connected, 504 with no answer in time, as IoT Hub),
  ``c2d`` (the same message id may be sent twice: dedupe is the gateway's job), ``twin`` and
  ``desire`` (through the holder), and the front's violation record.

Both connect as the service identity through the front, which leaves them unscoped: they
address a device by its inner topics (:func:`front.inner_topic`). The twin arithmetic is pure
(:class:`Twins`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import orjson

from gateway.core import iothub
from gateway.core.errors import FieldgateError
from gateway.identity.pki import SERVICE_IDENTITY, Pki, ensure_hub_identity
from gateway.identity.tls import client_context
from gateway.testbed.localhub.front import (
    EPOCH,
    IOTHUB,
    PRESENCE,
    inner_topic,
    outer_topic,
    read_violations,
)
from gateway.testbed.localhub.service import stay_subscribed
from gateway.uplink.mqtt import MqttClient

log = logging.getLogger("fieldgate.localhub.control")

TWIN_REQUESTS = "fieldgate-hub/twin/req/"
TWIN_ANSWERS = "fieldgate-hub/twin/res/"
ANY_MODULE = "+/modules/+"


class HubControlError(FieldgateError):
    pass


# -- the twin, pure --------------------------------------------------------------------------


def _size(section: dict[str, Any]) -> int:
    return len(orjson.dumps(section))


class Twins:
    """Every device's twin: ``{"desired": {...}, "reported": {...}}`` with their ``$version``."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.docs: dict[str, dict[str, dict[str, Any]]] = {}
        if path is not None and path.exists():
            try:
                loaded = orjson.loads(path.read_bytes())
            except orjson.JSONDecodeError as err:
                raise HubControlError(f"{path}: not a twin file (bad JSON: {err})") from err
            if not isinstance(loaded, dict):
                raise HubControlError(f"{path}: not a twin file (expected an object of devices)")
            self.docs = loaded

    def get(self, device: str) -> dict[str, dict[str, Any]]:
        doc = self.docs.setdefault(
            device, {"desired": {"$version": 1}, "reported": {"$version": 1}}
        )
        return {"desired": dict(doc["desired"]), "reported": dict(doc["reported"])}

    def patch(self, device: str, section: str, patch: object) -> tuple[int, int, str]:
        """Apply a patch to ``desired`` or ``reported``: (status, new version, error text)."""
        doc = self.get(device)
        if not isinstance(patch, dict):
            return 400, doc[section]["$version"], "a twin patch is a JSON object"
        patch = {k: v for k, v in patch.items() if k != "$version"}
        current = doc[section]
        merged = iothub.merge_patch({k: v for k, v in current.items() if k != "$version"}, patch)
        if _size(merged) > iothub.TWIN_SECTION_MAX:
            return (
                400,
                current["$version"],
                (
                    f"{section} would be {_size(merged)} bytes, over IoT Hub's "
                    f"{iothub.TWIN_SECTION_MAX}"
                ),
            )
        version = int(current["$version"]) + 1
        self.docs[device][section] = {**merged, "$version": version}
        self.save()
        return 200, version, ""

    def save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_bytes(orjson.dumps(self.docs))
        os.replace(tmp, self.path)


# A module identity (the edgeHub stand-in) scoped like a device: ``{device}/modules/{module}``.
MODULES = "/modules/"


def module_identity(device: str, module: str) -> str:
    return f"{device}{MODULES}{module}"


def _device_of(topic: str) -> tuple[str, str] | None:
    """``$iothub/{device}/X`` -> (device, ``$iothub/X``); a module's
    ``$iothub/{device}/modules/{module}/X`` -> (``{device}/modules/{module}``, ``$iothub/X``)."""
    if not topic.startswith(IOTHUB):
        return None
    parts = topic[len(IOTHUB) :].split("/", 3)
    device = parts[0]
    if len(parts) == 4 and parts[1] == MODULES.strip("/") and parts[2]:
        device = module_identity(parts[0], parts[2])
    outer = outer_topic(device, topic)
    return (device, outer) if device and outer is not None else None


def _service_context(pki: Pki) -> Any:
    cert, key = ensure_hub_identity(pki.root, SERVICE_IDENTITY)
    return client_context(pki.root_cert, cert, key, pki.passphrase())


# -- inside `fieldgate localhub` -------------------------------------------------------------


class TwinHolder:
    """Answers twin requests of devices and tools for as long as ``run`` runs."""

    def __init__(self, pki: Pki, *, host: str, port: int, path: Path | None) -> None:
        self.twins = Twins(path)
        self.host = host
        self.port = port
        self._context = _service_context(pki)
        self._client: MqttClient | None = None
        self.connected = asyncio.Event()

    def _send(self, topic: str, body: object) -> None:
        if self._client is not None:
            self._client.publish(topic, orjson.dumps(body), qos=0)

    def _message(self, topic: str, body: bytes) -> None:
        if topic.startswith(TWIN_REQUESTS):
            self._tool(topic[len(TWIN_REQUESTS) :], body)
            return
        found = _device_of(topic)
        if found is None:
            return
        device, outer = found
        rid = iothub.parse_twin_get(outer)
        if rid is not None:
            self._send(
                inner_topic(device, iothub.twin_response_topic(200, rid)), self.twins.get(device)
            )
            return
        rid = iothub.parse_twin_reported(outer)
        if rid is not None:
            try:
                patch = orjson.loads(body)
            except orjson.JSONDecodeError:
                patch = None
            status, version, why = self.twins.patch(device, "reported", patch)
            if status == 200:
                self._send(
                    inner_topic(
                        device, iothub.twin_response_topic(iothub.TWIN_PATCHED_STATUS, rid, version)
                    ),
                    None,
                )
            else:
                log.warning("twin of %s: reported patch refused: %s", device, why)
                self._send(
                    inner_topic(device, iothub.twin_response_topic(status, rid)), {"message": why}
                )

    def _tool(self, reply_to: str, body: bytes) -> None:
        try:
            request = orjson.loads(body)
            device = request["device"]
            desired = request.get("desired")
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self._send(TWIN_ANSWERS + reply_to, {"status": 400, "message": "bad twin request"})
            return
        if desired is not None:
            status, version, why = self.twins.patch(device, "desired", desired)
            if status != 200:
                self._send(TWIN_ANSWERS + reply_to, {"status": status, "message": why})
                return
            # Pushed at QoS 0: a device that is not connected reads its twin at its next
            # connect, as with IoT Hub (which queues no desired patches).
            patch = {**{k: v for k, v in desired.items() if k != "$version"}, "$version": version}
            self._send(inner_topic(device, iothub.desired_patch_topic(version)), patch)
        self._send(TWIN_ANSWERS + reply_to, {"status": 200, "twin": self.twins.get(device)})

    async def run(self, stop: asyncio.Event) -> None:
        def make() -> MqttClient:
            client = MqttClient(
                host=self.host,
                port=self.port,
                client_id=f"{SERVICE_IDENTITY}.twins",
                ssl_context=self._context,
                server_hostname="localhost",
                on_message=self._message,
            )
            self._client = client
            return client

        async def subscribe(client: MqttClient) -> None:
            await client.subscribe(
                [
                    (inner_topic("+", "$iothub/twin/GET/#"), 0),
                    (inner_topic("+", "$iothub/twin/PATCH/properties/reported/#"), 0),
                    (inner_topic(ANY_MODULE, "$iothub/twin/GET/#"), 0),
                    (inner_topic(ANY_MODULE, "$iothub/twin/PATCH/properties/reported/#"), 0),
                    (TWIN_REQUESTS + "#", 0),
                ]
            )

        try:
            await stay_subscribed("twin holder", make, subscribe, self.connected, stop)
        finally:
            self._client = None


# -- what tests and tools use ----------------------------------------------------------------


class HubControl:
    """``async with HubControl(pki, host, port) as hub: await hub.invoke(...)``."""

    def __init__(
        self,
        pki: Pki,
        host: str = "127.0.0.1",
        port: int = 8883,
        *,
        broker_log: Path | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.pki = pki
        self.host = host
        self.port = port
        self.broker_log = broker_log
        self.timeout = timeout
        self._name = uuid.uuid4().hex[:12]
        self._client: MqttClient | None = None
        self._epoch = ""
        self._presence: dict[str, dict[str, Any]] = {}
        self._waiting: dict[str, asyncio.Future[tuple[int, Any]]] = {}

    async def __aenter__(self) -> HubControl:
        client = MqttClient(
            host=self.host,
            port=self.port,
            client_id=f"{SERVICE_IDENTITY}.{self._name}",
            ssl_context=_service_context(self.pki),
            server_hostname="localhost",
            on_message=self._message,
            connect_timeout=self.timeout,
        )
        await client.__aenter__()
        self._client = client
        await client.subscribe([(EPOCH, 0), (PRESENCE + "+", 0), (PRESENCE + ANY_MODULE, 0)])
        # mosquitto handles packets in order: once this SUBACK is in, the retained presence
        # of the subscription before has been delivered.
        await client.subscribe(
            [
                (inner_topic("+", "$iothub/methods/res/#"), 1),
                (inner_topic(ANY_MODULE, "$iothub/methods/res/#"), 1),
                (TWIN_ANSWERS + self._name + "/#", 1),
            ]
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.disconnect()
            self._client = None

    def _message(self, topic: str, body: bytes) -> None:
        if topic == EPOCH:
            self._epoch = orjson.loads(body).get("epoch", "")
        elif topic.startswith(PRESENCE):
            self._presence[topic[len(PRESENCE) :]] = orjson.loads(body) if body else {}
        elif topic.startswith(TWIN_ANSWERS):
            answer = orjson.loads(body)
            self._answer(topic.rpartition("/")[2], int(answer.get("status", 500)), answer)
        else:
            found = _device_of(topic)
            parsed = iothub.parse_method_response(found[1]) if found else None
            if parsed is not None:
                status, rid = parsed
                try:
                    value: Any = orjson.loads(body) if body else None
                except orjson.JSONDecodeError:
                    value = body.decode("utf-8", "replace")
                self._answer(rid, status, value)

    def _answer(self, rid: str, status: int, value: Any) -> None:
        future = self._waiting.pop(rid, None)
        if future is not None and not future.done():
            future.set_result((status, value))

    @property
    def client(self) -> MqttClient:
        if self._client is None:
            raise HubControlError("HubControl is used outside its `async with` block")
        return self._client

    def connected(self, device: str) -> bool:
        """Whether the front has a connection of ``device`` now (in this run of the stand-in)."""
        state = self._presence.get(device, {})
        return bool(state.get("connected")) and state.get("epoch") == self._epoch

    async def _ask(
        self,
        rid: str,
        send: Any,
        timeout: float,  # noqa: ASYNC109 (the hub's own answer time)
    ) -> tuple[int, Any] | None:
        future: asyncio.Future[tuple[int, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = future
        try:
            await send()
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            return None
        finally:
            self._waiting.pop(rid, None)

    async def invoke(
        self,
        device: str,
        method: str,
        payload: object = None,
        # IoT Hub's responseTimeoutInSeconds: what turns into a 504, not a cancellation.
        timeout: float = 30.0,  # noqa: ASYNC109
    ) -> tuple[int, Any]:
        """A direct method call: (status, body) as IoT Hub's service API answers it."""
        if not self.connected(device):
            return iothub.DEVICE_NOT_CONNECTED_STATUS, {
                "message": f"device {device} is not connected"
            }
        body = orjson.dumps(payload)
        if len(body) > iothub.METHOD_PAYLOAD_MAX:
            return 400, {"message": f"payload of {len(body)} bytes is over IoT Hub's limit"}
        rid = uuid.uuid4().hex[:16]
        topic = inner_topic(device, iothub.method_request_topic(method, rid))

        async def send() -> None:
            sent = self.client.publish(topic, body, qos=1)
            assert sent is not None
            await sent

        answer = await self._ask(rid, send, timeout)
        if answer is None:
            return iothub.METHOD_TIMEOUT_STATUS, {
                "message": f"device {device} did not answer {method} within {timeout} s"
            }
        return answer

    async def c2d(self, device: str, body: object, message_id: str | None = None) -> str:
        """Queue a cloud-to-device message; returns its message id. Sending the same
        ``message_id`` again is a redelivery: it arrives again."""
        mid = message_id or uuid.uuid4().hex
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        if len(raw) > iothub.C2D_PAYLOAD_MAX:
            raise HubControlError(f"C2D body of {len(raw)} bytes is over IoT Hub's limit")
        props = {iothub.C2D_MESSAGE_ID: mid, "$.to": f"/devices/{device}/messages/devicebound"}
        sent = self.client.publish(iothub.c2d_topic(device, props), raw, qos=1)
        assert sent is not None
        await sent
        return mid

    send = c2d

    async def _twin_call(self, device: str, desired: object) -> dict[str, Any]:
        rid = uuid.uuid4().hex[:16]
        request = orjson.dumps({"device": device, "desired": desired})

        async def send() -> None:
            sent = self.client.publish(f"{TWIN_REQUESTS}{self._name}/{rid}", request, qos=1)
            assert sent is not None
            await sent

        answer = await self._ask(rid, send, self.timeout)
        if answer is None:
            raise HubControlError(
                f"no twin holder answered within {self.timeout} s "
                "(twins are held by a running `fieldgate localhub`)"
            )
        status, value = answer
        if status != 200:
            raise HubControlError(f"twin update refused ({status}): {value.get('message')}")
        twin: dict[str, Any] = value["twin"]
        return twin

    async def twin(self, device: str) -> dict[str, Any]:
        return await self._twin_call(device, None)

    async def desire(self, device: str, patch: dict[str, Any]) -> dict[str, Any]:
        """Update the desired properties (null deletes); returns the twin after the update."""
        return await self._twin_call(device, patch)

    def violations(self) -> list[dict[str, object]]:
        """What the front refused, from the broker log (``broker_log``)."""
        if self.broker_log is None:
            raise HubControlError("violations need the stand-in's broker log (broker_log=...)")
        return read_violations(self.broker_log)
