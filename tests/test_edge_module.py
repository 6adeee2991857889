"""fieldgate in module mode, a process started as the IoT Edge runtime starts a module (the
IOTEDGE_* variables, no --config), against the workload API and edgeHub stand-ins and a
simulated Modbus device: its config comes from the module twin, the device's telemetry
reaches the hub under the device's own identity, the reported properties say which config
version was applied, a bad desired patch is refused and reported with its field."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from edgerig import module_setup, standins
from test_edge_standins import EDGE_DEVICE, HUB
from test_localhub_front import until

from gateway.testbed.edge.hub import module_environment
from gateway.testbed.harness import Proc, fieldgate

pytest.importorskip("azure.iot.device", reason="azure-iot-device is in the edge extra")


def _reported(twin: dict[str, Any]) -> dict[str, Any]:
    section: dict[str, Any] = twin["reported"].get("fieldgate", {})
    return section


def test_module_mode_runs_from_the_twin_and_reports_applied_and_refused_configs(
    tmp_path: Path, procs: list[Proc]
) -> None:
    setup = module_setup(tmp_path, procs, 1)
    pki, address, doc, module = setup.pki, setup.address, setup.doc, setup.module
    device = doc["devices"][0]["id"]

    async def scenario() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        out: dict[str, Any] = {}
        async with standins(tmp_path, setup) as (workload, edge, hub):
            twin = await hub.desire(module.identity, {"fieldgate": {"config": doc}})
            first = twin["desired"]["$version"]
            env = module_environment(workload, hub=HUB, gateway_host=address, device=EDGE_DEVICE)
            env["FIELDGATE_EDGE_TRUST_FILE"] = str(tmp_path / "trust" / "edgehub.pem")
            proc = Proc(fieldgate("run"), tmp_path / "module.log", env=env)
            procs.append(proc)
            try:
                assert edge.service is not None
                service = edge.service

                async def reported() -> dict[str, Any]:
                    return _reported(await hub.twin(module.identity))

                async def until_reported(check: Any, what: str) -> dict[str, Any]:
                    for _ in range(300):
                        section = await reported()
                        if check(section):
                            return section
                        await asyncio.sleep(0.1)
                    raise AssertionError(
                        f"timed out waiting for {what}: {section}\n{proc.output()[-3000:]}"
                    )

                await until(
                    lambda: (
                        service.devices.get(device) is not None
                        and service.devices[device].readings > 0
                    ),
                    f"{device}'s readings at the hub",
                    within=40,
                )
                out["applied"] = await until_reported(
                    lambda s: (
                        (s.get("config") or {}).get("status") == "applied"
                        and s["devices"]["up"] == 1
                    ),
                    "config applied, the device up",
                )
                out["first"] = first
                bad = await hub.desire(
                    module.identity, {"fieldgate": {"config": {"batching": {"max_bytes": 10}}}}
                )
                out["second"] = bad["desired"]["$version"]
                out["refused"] = await until_reported(
                    lambda s: (s.get("config") or {}).get("version") == out["second"],
                    "the bad patch reported",
                )
                # Undone by the next patch (null deletes): valid again, and without a staged
                # apply wired the gateway restarts on it (its batches flushed first).
                good = await hub.desire(
                    module.identity, {"fieldgate": {"config": {"batching": {"max_bytes": None}}}}
                )
                out["third"] = good["desired"]["$version"]
                out["reapplied"] = await until_reported(
                    lambda s: (
                        (s.get("config") or {}).get("version") == out["third"]
                        and s["config"]["status"] == "applied"
                        and s["devices"]["up"] == 1
                    ),
                    "the good patch applied",
                )
                await until(lambda: hub.connected(device), f"{device} connected again", within=20)
                before = service.devices[device].readings
                await until(
                    lambda: service.devices[device].readings > before,
                    "readings after the restart",
                    within=20,
                )
                out["status"] = await hub.invoke(module.identity, "status", timeout=10)
                out["unknown"] = await hub.invoke(module.identity, "nope", timeout=10)
                out["connected"] = hub.connected(device)
            finally:
                out["exit"] = await loop.run_in_executor(None, proc.stop)
            out["violations"] = [v for v in edge.broker.violations if v.what != "tls"]
            out["hub_refused"] = list(service.refused)
            out["conflicts"] = list(service.tracker.conflicts)
            out["gaps"] = service.tracker.gaps()
            out["signed"] = workload.calls.signed
        return out

    out = asyncio.run(scenario())
    applied = out["applied"]["config"]
    assert applied["version"] == out["first"] and applied["source"] == "twin:fieldgate.config"
    # null deletes a property in a twin: no field, no reason once applied
    assert "field" not in applied and "reason" not in applied and len(applied["sha256"]) == 64
    assert out["applied"]["devices"]["total"] == 1
    refused = out["refused"]["config"]
    assert refused["status"] == "refused"
    assert refused["field"] == "twin:fieldgate.config.batching.max_bytes"
    assert "512" in refused["reason"]
    assert out["refused"]["devices"]["up"] == 1  # the running config is kept
    assert out["reapplied"]["config"]["source"] == "twin:fieldgate.config"
    status, body = out["status"]
    assert status == 200 and body["states"] == {out_device(body): "up"}
    assert out["unknown"][0] == 404
    assert out["connected"], "the device connects to edgeHub under its own identity"
    assert out["signed"] >= 1
    assert out["violations"] == []
    # The restart lost nothing and reused no sequence number.
    assert out["hub_refused"] == [] and out["conflicts"] == [] and out["gaps"] == {}
    assert (tmp_path / "trust" / "edgehub.pem").read_text() == pki.root_cert.read_text()
    assert out["exit"] == 0


def out_device(body: dict[str, Any]) -> str:
    (device,) = body["states"]
    return str(device)


def test_module_mode_without_the_runtimes_variables_exits_2_naming_them(tmp_path: Path) -> None:
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("IOTEDGE_")}
    env.update(
        IOTEDGE_WORKLOADURI=f"unix://{tmp_path}/workload.sock",
        IOTEDGE_DEVICEID="edge-1",
        IOTEDGE_MODULEID="fieldgate",
        IOTEDGE_IOTHUBHOSTNAME=HUB,
        IOTEDGE_GATEWAYHOSTNAME="localhost",
        IOTEDGE_APIVERSION="2019-01-30",
        IOTEDGE_AUTHSCHEME="sasToken",
    )
    for argv in (fieldgate("edge", "run"), fieldgate("run")):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert "IOTEDGE_MODULEGENERATIONID is not set" in done.stderr
    # And fieldgate run with neither --config nor the runtime says what it needs.
    plain = {k: v for k, v in env.items() if not k.startswith("IOTEDGE_")}
    done = subprocess.run(fieldgate("run"), env=plain, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--config is required" in done.stderr
    assert sys.executable


def test_a_desired_patch_changing_one_device_is_applied_as_a_diff_in_module_mode(
    tmp_path: Path, procs: list[Proc]
) -> None:
    """The module client's twin patch goes through the gateway's staged apply: the changed
    device restarts, the unaffected one keeps its one connection (its connects, from its own
    ``status`` method) and delivers without a gap."""
    setup = module_setup(tmp_path, procs, 2, "--period", "0.2")
    pki, address, doc, module = setup.pki, setup.address, setup.doc, setup.module
    kept, changed = (d["id"] for d in doc["devices"])

    async def scenario() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        out: dict[str, Any] = {}
        async with standins(tmp_path, setup) as (workload, edge, hub):
            await hub.desire(module.identity, {"fieldgate": {"config": doc}})
            env = module_environment(workload, hub=HUB, gateway_host=address, device=EDGE_DEVICE)
            env["FIELDGATE_EDGE_TRUST_FILE"] = str(tmp_path / "trust" / "edgehub.pem")
            proc = Proc(fieldgate("run"), tmp_path / "module.log", env=env)
            procs.append(proc)
            try:
                assert edge.service is not None
                service = edge.service
                await until(
                    lambda: all(
                        service.devices.get(d) is not None and service.devices[d].readings > 0
                        for d in (kept, changed)
                    ),
                    "both devices' readings at the hub",
                    within=40,
                )
                patch = dict(doc)
                patch["devices"] = [dict(d) for d in doc["devices"]]
                patch["devices"][1]["points"] = doc["devices"][1]["points"][:3]
                twin = await hub.desire(module.identity, {"fieldgate": {"config": patch}})
                version = twin["desired"]["$version"]
                for _ in range(300):
                    section = _reported(await hub.twin(module.identity))
                    if (section.get("config") or {}).get("version") == version:
                        break
                    await asyncio.sleep(0.1)
                out["config"] = section.get("config")
                before = service.devices[kept].readings
                await until(
                    lambda: service.devices[kept].readings > before + 20,
                    "the unaffected device delivering on",
                    within=20,
                )
                out["kept"] = await hub.invoke(kept, "status", timeout=10)
                out["changed"] = await hub.invoke(changed, "status", timeout=10)
            finally:
                out["exit"] = await loop.run_in_executor(None, proc.stop)
            out["gaps"] = service.tracker.gaps()
            out["conflicts"] = list(service.tracker.conflicts)
            out["log"] = proc.output()
        return out

    out = asyncio.run(scenario())
    assert out["config"]["status"] == "applied", out["config"]
    # A diff of the running gateway, not a restart of it.
    assert "reload applied: 0 added, 0 removed, 1 changed, 1 unchanged" in out["log"]
    assert "the gateway restarts" not in out["log"]
    # The audit stream went out on the module's output, as the module's own chain, and holds.
    from gateway.audit import files
    from gateway.consumer import read_record

    record = tmp_path / "record.jsonl"
    topics = {t for t, _, _ in read_record(record) if "fg-stream=audit" in t}
    assert topics and all(
        t.startswith(f"devices/{EDGE_DEVICE}/modules/fieldgate/messages/events/") for t in topics
    )
    audit = files.read(record)
    assert {r.chain_id for r in audit.records} == {f"{EDGE_DEVICE}.fieldgate"}
    kinds = [r.kind for r in audit.records]
    assert (
        kinds[0] == "gateway-started"
        and "config-loaded" in kinds
        and kinds[-1] == "gateway-stopped"
    )
    checked = subprocess.run(
        fieldgate("audit", "verify", str(record), "--cert", str(pki.gateway_cert)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    status, body = out["kept"]
    assert status == 200 and body["uplink"]["connects"] == 1, body
    status, body = out["changed"]
    assert status == 200 and body["uplink"]["connected"], body
    assert out["gaps"] == {} and out["conflicts"] == []
    assert out["exit"] == 0
