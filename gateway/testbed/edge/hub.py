"""The edgeHub stand-in: the local hub stand-in (mosquitto behind the TLS front) that also lets
the edge device's modules in by SAS token, with the twin holder serving module twins beside
device twins and the hub-side consumer recording telemetry.

What the module connects to (``IOTEDGE_GATEWAYHOSTNAME``) must be in the server certificate:
make the PKI with ``pki.init(..., server_ips=(address,))`` (azure-iot-device verifies the name
it connects to, and its MQTT port is fixed at 8883, so parallel tests take their own loopback
address). :func:`module_environment` is what the IoT Edge runtime sets in a module's container.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from gateway.identity.pki import Pki
from gateway.testbed.edge.sas import Module, checker
from gateway.testbed.edge.workload import WorkloadApi
from gateway.testbed.localhub.broker import Broker
from gateway.testbed.localhub.control import TwinHolder
from gateway.testbed.localhub.service import HubService

EDGE_PORT = 8883  # edgeHub's MQTT port; azure-iot-device cannot use another


def module_environment(
    workload: WorkloadApi, *, hub: str, gateway_host: str, device: str
) -> dict[str, str]:
    """The variables the IoT Edge runtime gives a module (``IOTEDGE_*``)."""
    return {
        "IOTEDGE_WORKLOADURI": workload.uri,
        "IOTEDGE_DEVICEID": device,
        "IOTEDGE_MODULEID": workload.module.module,
        "IOTEDGE_MODULEGENERATIONID": workload.module.generation_id,
        "IOTEDGE_IOTHUBHOSTNAME": hub,
        "IOTEDGE_GATEWAYHOSTNAME": gateway_host,
        "IOTEDGE_APIVERSION": workload.api_version,
        "IOTEDGE_AUTHSCHEME": "sasToken",
    }


class EdgeHub:
    """``async with EdgeHub(pki, address, hub_name, modules) as edge:`` - the broker with SAS
    module identities, the twin holder and (``record``) the hub service, until the block ends.
    ``clock`` is what token expiry is judged against."""

    def __init__(
        self,
        pki: Pki,
        *,
        address: str,
        hub: str,
        modules: list[Module],
        state: Path,
        record: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.pki = pki
        self.address = address
        self.hub = hub
        self.modules = {f"{m.device}/{m.module}": m for m in modules}
        self.state = state
        self.record = record
        self.broker = Broker(
            pki,
            host=address,
            port=EDGE_PORT,
            log_path=state / "broker.log",
            sas=checker(self.modules, hub, clock),
        )
        self.service: HubService | None = None
        self.holder: TwinHolder | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> EdgeHub:
        self.state.mkdir(parents=True, exist_ok=True)
        await self.broker.__aenter__()
        try:
            self.holder = TwinHolder(
                self.pki, host=self.address, port=EDGE_PORT, path=self.state / "twins.json"
            )
            self._tasks.append(asyncio.create_task(self.holder.run(self._stop), name="twins"))
            if self.record is not None:
                self.service = HubService(
                    self.pki, host=self.address, port=EDGE_PORT, record=self.record
                )
                self._tasks.append(asyncio.create_task(self.service.run(self._stop), name="hub"))
                await asyncio.wait_for(self.service.connected.wait(), 10)
            await asyncio.wait_for(self.holder.connected.wait(), 10)
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        for task in self._tasks:
            await task
        self._tasks.clear()
        if self.service is not None:
            self.service.close()
        await self.broker.__aexit__()
