"""What the module-mode tests share: a PKI whose server certificate carries a free loopback
address with edgeHub's port, a simulated Modbus fleet's config as the module twin would hold
it (no [hub]: the runtime gives it), and the stand-ins started together (the workload API,
edgeHub recording what it receives, the service side's control)."""

from __future__ import annotations

import contextlib
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from test_edge_standins import EDGE_DEVICE, HUB, free_edge_address

from gateway.identity import pki as pki_mod
from gateway.testbed.edge.hub import EDGE_PORT, EdgeHub
from gateway.testbed.edge.sas import Module
from gateway.testbed.edge.workload import WorkloadApi
from gateway.testbed.harness import Proc
from gateway.testbed.localhub.control import HubControl

from conftest import start_simulator


@dataclass
class ModuleSetup:
    pki: pki_mod.Pki
    address: str
    doc: dict[str, Any]  # the config for the module twin
    module: Module


def module_setup(tmp_path: Path, procs: list[Proc], devices: int, *sim: str) -> ModuleSetup:
    address = free_edge_address()
    pki = pki_mod.init(tmp_path / "pki", server_ips=("127.0.0.1", address))
    config_file, _ = start_simulator(procs, tmp_path, pki.root, EDGE_PORT, devices, *sim)
    doc = tomllib.loads(config_file.read_text())
    doc.pop("hub")  # module mode: the runtime's, not the twin's
    return ModuleSetup(pki, address, doc, Module(EDGE_DEVICE, "fieldgate"))


@contextlib.asynccontextmanager
async def standins(
    tmp_path: Path, setup: ModuleSetup
) -> AsyncIterator[tuple[WorkloadApi, EdgeHub, HubControl]]:
    pki, module = setup.pki, setup.module
    async with (
        WorkloadApi(tmp_path / "workload.sock", module, pki.root_cert.read_text()) as workload,
        EdgeHub(
            pki,
            address=setup.address,
            hub=HUB,
            modules=[module],
            state=tmp_path / "hub",
            record=tmp_path / "record.jsonl",
        ) as edge,
        HubControl(pki, setup.address, EDGE_PORT, timeout=10) as hub,
    ):
        yield workload, edge, hub
