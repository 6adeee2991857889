"""The module's seam to the gateway's staged apply (issue 14 item 2, another branch): a valid
desired patch is handed to the ``stage`` callable, validated, with its source; what it answers
is what the reported properties say; a refused patch never reaches it. In process, with the
real module client, the edge stand-ins, a Modbus simulator and the real Gateway."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from edgerig import module_setup, standins
from test_edge_standins import EDGE_DEVICE, HUB
from test_localhub_front import until

from gateway.app import Gateway
from gateway.config import Config
from gateway.edge import env as edge_env
from gateway.edge.module import EdgeModule, StageOutcome
from gateway.events import read_events
from gateway.testbed.edge.hub import module_environment
from gateway.testbed.harness import Proc

pytest.importorskip("azure.iot.device", reason="azure-iot-device is in the edge extra")

pytestmark = [
    pytest.mark.filterwarnings("ignore:ssl.PROTOCOL_TLS:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:paho"),
]


def test_a_valid_patch_goes_to_the_stage_seam_and_its_outcome_is_reported(
    tmp_path: Path, procs: list[Proc], monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = module_setup(tmp_path, procs, 1)
    address, doc, module = setup.address, setup.doc, setup.module
    device = doc["devices"][0]["id"]
    staged: list[tuple[Gateway, Config, str]] = []
    answers = [
        StageOutcome("applied"),
        StageOutcome("failed", None, "rolled back: the test's stage said so"),
    ]

    async def stage(gateway: Gateway, config: Config, source: str) -> StageOutcome:
        staged.append((gateway, config, source))
        return answers[len(staged) - 1]

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with standins(tmp_path, setup) as (workload, _, hub):
            await hub.desire(module.identity, {"fieldgate": {"config": doc}})
            env = module_environment(workload, hub=HUB, gateway_host=address, device=EDGE_DEVICE)
            for name, value in env.items():
                monkeypatch.setenv(name, value)
            edge = EdgeModule(
                edge_env.read(os.environ),
                trust_file=tmp_path / "trust" / "edgehub.pem",
                stage=stage,
                report_interval=0.2,
                base=tmp_path,
            )
            stop = asyncio.Event()
            task = asyncio.create_task(edge.run(stop))

            async def reported_config(version: int, status: str) -> dict[str, Any]:
                for _ in range(200):
                    twin = await hub.twin(module.identity)
                    section = twin["reported"].get("fieldgate", {}).get("config") or {}
                    if section.get("version") == version and section.get("status") == status:
                        return dict(section)
                    await asyncio.sleep(0.05)
                raise AssertionError(f"{version} {status} not reported: {twin['reported']}")

            try:
                await until(lambda: hub.connected(device), f"{device} connected", within=30)
                first = edge.gateway
                patched = await hub.desire(
                    module.identity, {"fieldgate": {"config": {"batching": {"max_age": 2.0}}}}
                )
                out["applied"] = await reported_config(patched["desired"]["$version"], "applied")
                out["reload"] = await hub.invoke(module.identity, "reload", timeout=10)
                out["after_reload"] = await reported_config(
                    patched["desired"]["$version"], "failed"
                )
                bad = await hub.desire(
                    module.identity, {"fieldgate": {"config": {"hub": {"address": "10.0.0.1"}}}}
                )
                out["refused"] = await reported_config(bad["desired"]["$version"], "refused")
                out["same_gateway"] = edge.gateway is first
                assert first is not None
                out["connects"] = first.sessions[device].stats.connects
                out["state_dir"] = first.config.gateway.state_dir
            finally:
                stop.set()
                await task
        return out

    out = asyncio.run(scenario())
    assert len(staged) == 2  # the patch and the reload; never the refused patch
    gateway, config, source = staged[0]
    assert gateway is staged[1][0]  # the running gateway, both times
    assert source == "twin:fieldgate.config"
    assert config.batching.max_age == 2.0 and config.devices[0].id == device
    assert config.hub.address == address and config.hub.hostname == HUB
    status, body = out["reload"]
    assert status == 400 and body["status"] == "failed"
    assert out["after_reload"]["reason"] == "rolled back: the test's stage said so"
    assert out["refused"]["field"] == "twin:fieldgate.config.hub.address"
    # Staged, not restarted: the same gateway, its device's session connected once.
    assert out["same_gateway"] and out["connects"] == 1
    kinds = [e["kind"] for e in read_events(out["state_dir"])]
    assert "edge-config-refused" in kinds
