"""The module twin, pure: a desired config validated by the file's models, with the hub from
the runtime; refusals naming the twin's field; a config file named by path and SHA-256; the
runtime's environment checked; reported properties and their pace."""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path
from typing import Any

import pytest

from gateway.config import render_toml
from gateway.core.iothub import merge_patch
from gateway.edge import env as edge_env
from gateway.edge.twin import (
    ConfigState,
    ReportPacer,
    TwinConfigError,
    desired_config,
    reported,
)
from gateway.identity import pki as pki_mod
from gateway.testbed import simconfig

RUNTIME = {
    "IOTEDGE_WORKLOADURI": "unix:///var/run/iotedge/workload.sock",
    "IOTEDGE_DEVICEID": "edge-1",
    "IOTEDGE_MODULEID": "fieldgate",
    "IOTEDGE_MODULEGENERATIONID": "6371",
    "IOTEDGE_IOTHUBHOSTNAME": "myhub.azure-devices.net",
    "IOTEDGE_GATEWAYHOSTNAME": "edge-1.plant.local",
    "IOTEDGE_APIVERSION": "2019-01-30",
    "IOTEDGE_AUTHSCHEME": "sasToken",
}
ENV = edge_env.read(RUNTIME)


@pytest.fixture
def doc(pki_dir: Path, tmp_path: Path) -> dict[str, Any]:
    config = simconfig.skeleton(pki_dir=pki_dir, hub_port=8883, state_dir=tmp_path / "state")
    config.pop("hub")
    config["devices"] = [
        {
            "id": "plc-1",
            **simconfig.device_files(pki_dir, "plc-1"),
            "modbus": {"host": "127.0.0.1", "port": 15020, "unit": 1},
            "identity": "none",
            "points": [{"name": "t", "address": 0, "type": "int16"}],
        }
    ]
    return config


@pytest.fixture
def ca(pki_dir: Path) -> Path:
    return pki_mod.Pki(pki_dir).root_cert


def test_the_twins_config_gets_the_hub_from_the_runtime(doc: dict[str, Any], ca: Path) -> None:
    found = desired_config({"fieldgate": {"config": doc}, "$version": 7}, ENV, ca)
    hub = found.config.hub
    assert (hub.hostname, hub.address, hub.server_name, hub.port) == (
        "myhub.azure-devices.net",
        "edge-1.plant.local",
        "edge-1.plant.local",
        8883,
    )
    assert hub.ca_file == ca and found.version == 7 and found.source == "twin:fieldgate.config"
    # The same config in another key order hashes the same.
    again = desired_config({"fieldgate": {"config": dict(reversed(doc.items()))}}, ENV, ca)
    assert again.sha256 == found.sha256


@pytest.mark.parametrize(
    ("patch", "field", "why"),
    [
        ({"batching": {"max_bytes": 10}}, "twin:fieldgate.config.batching.max_bytes", "512"),
        ({"hub": {"address": "10.0.0.5"}}, "twin:fieldgate.config.hub.address", "runtime"),
        ({"devices": [{"id": "bad id"}]}, "twin:fieldgate.config.devices[0].id", "match"),
        ({"gatway": {}}, "twin:fieldgate.config.gatway", "unknown field"),
    ],
)
def test_a_bad_desired_config_is_refused_naming_the_twins_field(
    doc: dict[str, Any], ca: Path, patch: dict[str, Any], field: str, why: str
) -> None:
    desired = merge_patch({"fieldgate": {"config": doc}}, {"fieldgate": {"config": patch}})
    with pytest.raises(TwinConfigError) as refused:
        desired_config({**desired, "$version": 3}, ENV, ca)
    assert refused.value.field == field
    assert why in refused.value.reason
    state = ConfigState.refused(refused.value)
    assert (state.version, state.status, state.field) == (3, "refused", field)


def test_neither_or_both_config_sources_are_refused(doc: dict[str, Any], ca: Path) -> None:
    for desired in ({}, {"fieldgate": {"config": doc, "config_file": {"path": "/x"}}}):
        with pytest.raises(TwinConfigError, match=r"fieldgate\.config or fieldgate\.config_file"):
            desired_config(desired, ENV, ca)


def test_a_config_file_is_used_only_with_its_named_sha256(
    doc: dict[str, Any], ca: Path, tmp_path: Path
) -> None:
    file = tmp_path / "volume" / "gateway.toml"
    file.parent.mkdir()
    file.write_text(render_toml(doc))
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    found = desired_config(
        {"fieldgate": {"config_file": {"path": str(file), "sha256": digest}}}, ENV, ca
    )
    assert found.source == f"twin:fieldgate.config_file ({file})" and found.sha256 == digest
    assert [d.id for d in found.config.devices] == ["plc-1"]
    with pytest.raises(TwinConfigError) as refused:
        desired_config(
            {"fieldgate": {"config_file": {"path": str(file), "sha256": "0" * 64}}}, ENV, ca
        )
    assert refused.value.field == "twin:fieldgate.config_file.sha256"
    assert digest in refused.value.reason
    for value, field in (
        ({"path": "gateway.toml", "sha256": digest}, "path"),
        ({"path": str(file), "sha256": "abc"}, "sha256"),
        ({"path": str(tmp_path / "none.toml"), "sha256": digest}, "path"),
    ):
        with pytest.raises(TwinConfigError) as refused:
            desired_config({"fieldgate": {"config_file": value}}, ENV, ca)
        assert refused.value.field == f"twin:fieldgate.config_file.{field}"
    # Inside the file the fields are named as in the file, after its source.
    bad = tomllib.loads(file.read_text())
    bad["batching"]["max_bytes"] = 10
    file.write_text(render_toml(bad))
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    with pytest.raises(TwinConfigError) as refused:
        desired_config(
            {"fieldgate": {"config_file": {"path": str(file), "sha256": digest}}}, ENV, ca
        )
    assert refused.value.field == f"twin:fieldgate.config_file ({file}).batching.max_bytes"


def test_the_runtimes_environment_is_checked_naming_what_is_missing_or_wrong() -> None:
    assert edge_env.detected(RUNTIME) and not edge_env.detected({"PATH": "/bin"})
    partial = {k: v for k, v in RUNTIME.items() if k != "IOTEDGE_APIVERSION"}
    with pytest.raises(
        edge_env.EdgeEnvError, match="IOTEDGE_MODULEID, IOTEDGE_APIVERSION are not set"
    ) as err:
        edge_env.read({**partial, "IOTEDGE_MODULEID": " "})
    assert "IOTEDGE_MODULEID" in str(err.value) and err.value.exit_code == 2
    with pytest.raises(edge_env.EdgeEnvError, match="only 'sasToken'"):
        edge_env.read({**RUNTIME, "IOTEDGE_AUTHSCHEME": "x509"})
    with pytest.raises(edge_env.EdgeEnvError, match="unix socket"):
        edge_env.read({**RUNTIME, "IOTEDGE_WORKLOADURI": "http://127.0.0.1:15581"})


def test_reported_names_every_state_and_is_paced_on_change() -> None:
    first = reported(ConfigState(4, "applied"), {"a": "up", "b": "down"}, {"queued": 2}, None)
    assert first["fieldgate"]["devices"] == {
        "total": 2,
        "starting": 0,
        "up": 1,
        "down": 1,
        "quarantined": 0,
    }
    # A state no device is in any more is sent as 0: a reported patch merges.
    later = reported(ConfigState(4, "applied"), {"a": "up", "b": "up"}, {"queued": 0}, None)
    assert later["fieldgate"]["devices"]["down"] == 0
    pacer = ReportPacer(1.0)
    assert pacer.wait(first, 10.0) == 0
    pacer.done(first, 10.0)
    assert pacer.wait(first, 10.2) is None  # unchanged: nothing to send
    assert pacer.wait(later, 10.2) == pytest.approx(0.8)
    assert pacer.wait(later, 12.0) == 0
