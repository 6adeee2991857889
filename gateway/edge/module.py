"""Module mode: fieldgate started by the IoT Edge runtime, configured from its module twin.

The one product module that imports azure-iot-device (the ``edge`` extra; it pins
paho-mqtt < 2, which the rest of fieldgate does not use), and only inside :func:`_sdk_client`
and :func:`_trust_bundle`, so a plain install imports this file without it.

What it does, in order:

1. the module client: ``IoTHubModuleClient.create_from_edge_environment()`` (azure.iot.device.aio)
   signs its SAS token through the workload API and trusts the workload API's bundle for
   edgeHub; the same bundle is written to ``trust_file`` and becomes ``hub.ca_file`` of the
   devices' own sessions, which connect to edgeHub (IOTEDGE_GATEWAYHOSTNAME) each with its
   X.509 identity, as before;
2. the twin's desired properties give the config (:mod:`gateway.edge.twin`); a valid one starts
   the gateway, a refused one is reported with its field and the module waits for a better one;
3. at a desired patch the desired document is read again and validated: refused ones
   change nothing and are reported; valid ones go to ``stage`` (the gateway's staged apply,
   wired by the composition root) or, without one, the gateway is restarted with the new
   config (stopping flushes every open batch into the store first);
4. reported properties (config version and status, devices by state, store depth, last error)
   follow changes, at most one patch per ``report_interval``;
5. direct methods on the module identity: ``status`` and ``reload`` (re-read the twin's desired
   properties and take them as a patch).

The SDK calls its handlers on its own threads: they only hand the patch or request to the
loop (``call_soon_threadsafe``); everything else runs on the loop. Setting an SDK handler
subscribes and blocks, so it is done in a worker thread.

The audit stream (issue 13) is the integrator's: :meth:`EdgeModule.send_output` sends one
message on a module output (``audit``) for edgeHub's routes to carry upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from gateway.audit.stream import Send
from gateway.config import Config
from gateway.core.errors import FieldgateError
from gateway.core.iothub import merge_patch, module_sender
from gateway.edge.env import EdgeEnv
from gateway.edge.twin import (
    ConfigState,
    Desired,
    ReportPacer,
    TwinConfigError,
    desired_config,
    reported,
    version_of,
)

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("fieldgate.edge")

AUDIT_OUTPUT = "audit"
METHOD_NOT_FOUND = 404


class EdgeError(FieldgateError):
    """Module mode failed while running (the module client, the workload API)."""


@dataclass(frozen=True)
class StageOutcome:
    """What the staged apply did with a validated config: ``applied``; ``refused`` (nothing
    changed: ``field`` and ``reason`` say why); ``failed`` (applying failed, the last good
    config was restored)."""

    status: Literal["applied", "refused", "failed"]
    field: str | None = None
    reason: str | None = None
    # Refused only because a section that is not applied live changed (hub, batching, ...):
    # the module then restarts the gateway with it instead.
    needs_restart: bool = False


# The seam to the gateway's staged apply: (the running gateway, the new config, its source).
Stage = Callable[["Gateway", Config, str], Awaitable[StageOutcome]]


def sdk_missing() -> str | None:
    """Why module mode cannot run here (the ``edge`` extra is not installed), or None."""
    try:
        import azure.iot.device  # noqa: F401
    except ModuleNotFoundError as err:
        return f"module mode needs azure-iot-device ({err}): pip install 'fieldgate[edge]'"
    return None


def _sdk_client() -> Any:
    from azure.iot.device.aio import IoTHubModuleClient

    # The SDK reads the IOTEDGE_* variables itself and fetches the trust bundle (blocking).
    return IoTHubModuleClient.create_from_edge_environment()


def _trust_bundle(env: EdgeEnv) -> str:
    from azure.iot.device.iothub.edge_hsm import IoTEdgeHsm

    hsm = IoTEdgeHsm(env.module_id, env.generation_id, env.workload_uri, env.api_version)  # type: ignore[no-untyped-call]
    return str(hsm.get_certificate())  # type: ignore[no-untyped-call]


def _method_response(request: Any, status: int, payload: Any) -> Any:
    from azure.iot.device import MethodResponse

    return MethodResponse.create_from_method_request(request, status, payload)


def _make_gateway(config: Config, audit_output: Send | None = None) -> Gateway:
    from gateway.app import Gateway

    return Gateway(config, adopt_stranded=True, config_source="twin", audit_output=audit_output)


async def staged_apply(gateway: Gateway, config: Config, source: str) -> StageOutcome:
    """The running gateway applies the new config as a diff (:meth:`Gateway.stage`):
    unaffected devices keep their sessions; a failure part-way restores the last good one."""
    # A patch that arrives while the gateway is still starting waits for it (else it would be
    # refused as "not running" and never tried again).
    await gateway.wait_running()
    outcome = await gateway.stage(config, source)
    if outcome.status == "applied":
        return StageOutcome("applied")
    if outcome.status == "refused":
        restart = bool(outcome.plan.get("restart"))
        return StageOutcome("refused", outcome.field, outcome.error, needs_restart=restart)
    return StageOutcome("failed", outcome.field, outcome.error)


class EdgeModule:
    def __init__(
        self,
        env: EdgeEnv,
        *,
        trust_file: Path,
        stage: Stage | None = None,
        report_interval: float = 1.0,
        base: Path | None = None,
        make_gateway: Callable[[Config, Send | None], Gateway] = _make_gateway,
    ) -> None:
        self.env = env
        self.trust_file = trust_file
        self.stage = stage
        self.base = base
        self.make_gateway = make_gateway
        self.pacer = ReportPacer(report_interval)
        self.desired: dict[str, Any] = {}
        self.config_state: ConfigState | None = None
        self.gateway: Gateway | None = None
        self.last_error: str | None = None
        self._client: Any = None
        self._gateway_task: asyncio.Task[None] | None = None
        self._gateway_stop = asyncio.Event()
        self._inbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._changed = asyncio.Event()

    # -- the SDK side ----------------------------------------------------------------------

    async def _connect(self) -> Any:
        try:
            bundle = await asyncio.to_thread(_trust_bundle, self.env)
            client = await asyncio.to_thread(_sdk_client)
        except Exception as err:  # the SDK raises OSError, ValueError or its own IoTEdgeError
            raise EdgeError(f"the workload API ({self.env.workload_uri}): {err}") from err
        self._write_bundle(bundle)
        loop = asyncio.get_running_loop()

        def handed(kind: str) -> Callable[[Any], None]:
            def hand(item: Any) -> None:  # on an SDK thread
                loop.call_soon_threadsafe(self._inbox.put_nowait, (kind, item))

            return hand

        try:
            await client.connect()
            for name, kind in (
                ("on_twin_desired_properties_patch_received", "patch"),
                ("on_method_request_received", "method"),
            ):
                await asyncio.to_thread(setattr, client, name, handed(kind))
        except Exception as err:
            with contextlib.suppress(Exception):
                await client.shutdown()
            raise EdgeError(
                f"cannot connect the module identity {self.env.device_id}/{self.env.module_id} "
                f"to edgeHub at {self.env.gateway_hostname}: {err}"
            ) from err
        return client

    def _write_bundle(self, bundle: str) -> None:
        """The workload API's roots, for the devices' sessions (``hub.ca_file``)."""
        self.trust_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.trust_file.with_name(self.trust_file.name + ".tmp")
        tmp.write_text(bundle)
        os.replace(tmp, self.trust_file)

    async def send_output(
        self, payload: bytes, output: str = AUDIT_OUTPUT, properties: dict[str, str] | None = None
    ) -> None:
        """One message on a module output; returns once edgeHub took it (its PUBACK)."""
        from azure.iot.device import Message

        if self._client is None:
            raise EdgeError("the module client is not connected")
        props = dict(properties or {})
        message = Message(  # type: ignore[no-untyped-call]
            payload, content_type=props.pop("$.ct", None), content_encoding="utf-8"
        )
        message.custom_properties = {k: v for k, v in props.items() if not k.startswith("$.")}
        await self._client.send_message_to_output(message, output)

    def _module_config(self, config: Config) -> Config:
        """The audit chain is the module's: named ``{device}.{module}`` (what a consumer of the
        module's output sees as its sender), sent on the module output ``audit``."""
        chain = module_sender(self.env.device_id, self.env.module_id)
        return config.model_copy(
            update={"gateway": config.gateway.model_copy(update={"id": chain})}
        )

    async def _send_audit(self, payload: bytes, properties: dict[str, str]) -> None:
        """The gateway's audit stream, on the module output ``audit``."""
        await self.send_output(payload, AUDIT_OUTPUT, properties)

    # -- the run ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        client = self._client = await self._connect()
        try:
            twin = await client.get_twin()
            self.desired = dict(twin.get("desired", {}))
            log.info(
                "module %s/%s connected to edgeHub %s; desired version %d",
                self.env.device_id,
                self.env.module_id,
                self.env.gateway_hostname,
                version_of(self.desired),
            )
            await self.take(self.desired)
            async with asyncio.TaskGroup() as tg:
                reporter = tg.create_task(self._report(), name="edge-report")
                await self._serve(stop)
                await self._stop_gateway()
                await self._send_report()  # the final state, unpaced
                reporter.cancel("stop")
        finally:
            await self._stop_gateway()
            self._client = None
            with contextlib.suppress(Exception):
                await client.shutdown()

    async def _serve(self, stop: asyncio.Event) -> None:
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                item = asyncio.ensure_future(self._inbox.get())
                await asyncio.wait([item, stopping], return_when=asyncio.FIRST_COMPLETED)
                if not item.done():
                    item.cancel()
                    break
                kind, value = item.result()
                if kind == "patch":
                    await self._patched(value)
                else:
                    await self._method(value)
        finally:
            stopping.cancel()

    async def _patched(self, patch: dict[str, Any]) -> None:
        if version_of(patch) and version_of(patch) <= version_of(self.desired):
            return  # already in the desired document read at connect
        # The whole desired document is read again: after a reconnect the SDK hands the whole
        # document over as if it were a patch, and merging that would keep properties deleted
        # meanwhile. Merging is the fallback when the read fails.
        try:
            twin = await self._client.get_twin()
            desired = dict(twin.get("desired", {}))
        except Exception as err:
            log.warning("twin not read after a desired patch (%s): merging the patch", err)
            desired = merge_patch(self.desired, patch)
            if "$version" in patch:
                desired["$version"] = patch["$version"]
        if version_of(desired) < version_of(patch):
            desired = merge_patch(desired, patch)
            desired["$version"] = patch["$version"]
        self.desired = desired
        await self.take(self.desired)

    async def take(self, desired: dict[str, Any]) -> ConfigState:
        """Validate the desired config and apply it; the outcome becomes the reported one."""
        try:
            # In a thread: the checks read files and resolve device host names (up to 3 s),
            # and the running gateway shares this loop.
            found = await asyncio.to_thread(
                desired_config, desired, self.env, self.trust_file, base=self.base
            )
        except TwinConfigError as err:
            log.warning("desired version %d refused: %s: %s", err.version, err.field, err.reason)
            state = ConfigState.refused(err)
            if self.gateway is not None:  # the running gateway's events (no state otherwise)
                self.gateway.events.record(
                    "edge-config-refused",
                    None,
                    err.reason,
                    field=err.field,
                    version=err.version,
                    source=err.path,
                )
        else:
            state = await self._apply(found)
        self.config_state = state
        self._changed.set()
        return state

    async def _apply(self, found: Desired) -> ConfigState:
        def state(outcome: StageOutcome) -> ConfigState:
            return ConfigState(
                found.version,
                outcome.status,
                found.source,
                found.sha256,
                outcome.field,
                outcome.reason,
            )

        if self.gateway is not None and self.stage is not None:
            try:
                outcome = await self.stage(
                    self.gateway, self._module_config(found.config), found.source
                )
            except Exception as err:  # a bug in the apply: reported, the module stays up
                log.exception("staging config version %d failed", found.version)
                outcome = StageOutcome("failed", None, f"{type(err).__name__}: {err}")
            if not outcome.needs_restart:
                return state(outcome)
            log.info(
                "config version %d changes %s, which is not applied live: the gateway restarts",
                found.version,
                outcome.field,
            )
        # No gateway running, no staged apply, or a change that needs a restart: start (or
        # restart) with the new config. Stopping flushes every open batch into the store; the
        # store carries on.
        await self._stop_gateway()
        self._start_gateway(found.config)
        log.info("config version %d from %s applied", found.version, found.source)
        return state(StageOutcome("applied"))

    def _start_gateway(self, config: Config) -> None:
        gateway = self.gateway = self.make_gateway(self._module_config(config), self._send_audit)
        stop = self._gateway_stop = asyncio.Event()
        for health in gateway.health.values():
            health.watchers.append(self._changed.set)
        self.last_error = None
        self._gateway_task = asyncio.create_task(self._run_gateway(gateway, stop), name="gateway")

    async def _run_gateway(self, gateway: Gateway, stop: asyncio.Event) -> None:
        try:
            await gateway.run(stop)
        except FieldgateError as err:
            # The module stays up to report it and to take a better config.
            self._failed(gateway, str(err))
        except Exception as err:
            log.exception("the gateway failed")
            self._failed(gateway, f"{type(err).__name__}: {err}")

    def _failed(self, gateway: Gateway, why: str) -> None:
        log.error("the gateway stopped: %s", why)
        self.last_error = why
        if self.gateway is gateway:
            self.gateway = None
            state = self.config_state
            if state is not None:
                self.config_state = ConfigState(
                    state.version, "failed", state.source, state.sha256, None, why
                )
        self._changed.set()

    async def _stop_gateway(self) -> None:
        task = self._gateway_task
        if task is None:
            return
        self._gateway_stop.set()
        await task
        self._gateway_task = None
        self.gateway = None

    # -- methods ---------------------------------------------------------------------------

    async def _method(self, request: Any) -> None:
        name = request.name
        if name == "status":
            status, payload = 200, self.status()
        elif name == "reload":
            try:
                twin = await self._client.get_twin()
            except Exception as err:
                status, payload = 503, {"message": f"cannot read the twin: {err}"}
            else:
                self.desired = dict(twin.get("desired", {}))
                state = await self.take(self.desired)
                status = 200 if state.status == "applied" else 400
                payload = asdict(state)
        else:
            status, payload = METHOD_NOT_FOUND, {"message": f"no method {name!r} (status, reload)"}
        try:
            await self._client.send_method_response(_method_response(request, status, payload))
        except Exception as err:
            log.warning("method %s: the answer was not sent: %s", name, err)

    def status(self) -> dict[str, Any]:
        """The whole gateway: config, every device's state, store depth, last error."""
        gateway = self.gateway
        states = {d: h.state for d, h in gateway.health.items()} if gateway else {}
        section = reported(self.config_state, states, self._store(), self._last_error())
        return {**section["fieldgate"], "states": states}

    def _store(self) -> dict[str, int]:
        queue = self.gateway.queue if self.gateway is not None else None
        rows = queue.depth() if queue is not None else []
        return {
            "queued": sum(r.queued for r in rows),
            "leased": sum(r.leased for r in rows),
            "bytes": sum(r.bytes for r in rows),
        }

    def _last_error(self) -> str | None:
        if self.last_error is not None or self.gateway is None:
            return self.last_error
        for device, health in sorted(self.gateway.health.items()):
            if health.last_error:
                return f"{device}: {health.last_error}"
        return None

    # -- reported --------------------------------------------------------------------------

    def _report_now(self) -> dict[str, Any]:
        gateway = self.gateway
        states = {d: h.state for d, h in gateway.health.items()} if gateway else {}
        return reported(self.config_state, states, self._store(), self._last_error())

    async def _send_report(self) -> None:
        report = self._report_now()
        if report == self.pacer.sent:
            return
        try:
            await self._client.patch_twin_reported_properties(report)
        except Exception as err:
            log.warning("reported properties not sent: %s", err)
            self.pacer.at = time.monotonic()  # tried: the next try waits its interval
            return
        self.pacer.done(report, time.monotonic())

    async def _report(self) -> None:
        """Reported properties on change, paced. The store's depth changes without an event,
        so it is looked at every ``interval`` as well."""
        interval = self.pacer.interval
        while True:
            self._changed.clear()
            wait = self.pacer.wait(self._report_now(), time.monotonic())
            if wait is None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await self._changed.wait()
                continue
            if wait > 0:
                await asyncio.sleep(wait)
            await self._send_report()
