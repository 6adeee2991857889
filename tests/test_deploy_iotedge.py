"""The IoT Edge deployment manifest template (deploy/iotedge/deployment.template.json), read the
way IoT Edge reads it: createOptions is a JSON object serialized as a string that the edge agent
keeps in 512-character pieces (createOptions, createOptions01, ... joined in name order, as
its ChunkedValue does); the module runs non-root on a read-only root with no capabilities, a
state volume, a serial port and bounded logs; edgeHub's routes send child devices' telemetry
upstream, and the module's own outputs, and nothing twice."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "deploy" / "iotedge" / "deployment.template.json"
CONTAINERFILE = REPO / "deploy" / "container" / "Containerfile"
CHUNK = 512


def manifest() -> dict[str, Any]:
    return json.loads(MANIFEST.read_text())


def agent() -> dict[str, Any]:
    return manifest()["modulesContent"]["$edgeAgent"]["properties.desired"]


def create_options(settings: dict[str, Any]) -> dict[str, Any]:
    """Join createOptions, createOptions01..99 in name order and parse the result."""
    names = sorted(k for k in settings if re.fullmatch(r"createOptions(0[1-9]|[1-9]\d)?", k))
    assert names and names[0] == "createOptions", names
    assert names == ["createOptions"] + [f"createOptions{i:02d}" for i in range(1, len(names))]
    parts = [settings[name] for name in names]
    assert all(isinstance(p, str) for p in parts), "createOptions must be strings"
    assert all(len(p) <= CHUNK for p in parts), [len(p) for p in parts]
    # Each piece but the last is full: how the edge agent itself splits a long string.
    assert all(len(p) == CHUNK for p in parts[:-1]), [len(p) for p in parts]
    value = json.loads("".join(parts))
    assert isinstance(value, dict)
    return value


def test_the_module_runs_unprivileged_on_a_read_only_root() -> None:
    module = agent()["modules"]["fieldgate"]
    assert module["type"] == "docker" and module["status"] == "running"
    assert module["restartPolicy"] == "always"
    options = create_options(module["settings"])
    host = options["HostConfig"]
    user = options["User"]
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), user  # numeric, not root
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"] and not host.get("CapAdd")
    assert "no-new-privileges" in host["SecurityOpt"]
    assert host.get("Privileged") is not True
    binds = {b.split(":")[1]: b for b in host["Binds"]}
    assert binds["/var/lib/fieldgate"].startswith("fieldgate-state:")  # a named volume
    assert binds["/etc/fieldgate"].endswith(":ro")
    assert set(host["Tmpfs"]) == {"/tmp"}
    device = host["Devices"][0]
    assert device["PathOnHost"].startswith("/dev/tty") and device["CgroupPermissions"] == "rw"
    assert "dialout" in host["GroupAdd"]
    log = host["LogConfig"]
    assert log["Type"] == "json-file"
    assert re.fullmatch(r"\d+[kmg]", log["Config"]["max-size"]) and int(log["Config"]["max-file"])


def test_the_module_matches_the_image() -> None:
    """The manifest names what the Containerfile builds: the same user and state folder."""
    options = create_options(agent()["modules"]["fieldgate"]["settings"])
    text = CONTAINERFILE.read_text()
    assert f"USER {options['User']}" in text
    assert 'VOLUME ["/var/lib/fieldgate"]' in text
    assert "HEALTHCHECK" in text


def test_a_long_create_options_is_split_and_joined_back() -> None:
    """The template's own options exceed 512 characters, so the join above is exercised."""
    settings = agent()["modules"]["fieldgate"]["settings"]
    assert "createOptions01" in settings
    whole = json.dumps(create_options(settings), separators=(",", ":"))
    assert len(whole) > CHUNK


def test_the_system_modules_are_iot_edge_1_6() -> None:
    desired = agent()
    assert desired["schemaVersion"] == "1.1"
    assert desired["runtime"]["type"] == "docker"
    system = desired["systemModules"]
    assert system["edgeAgent"]["settings"]["image"] == "mcr.microsoft.com/azureiotedge-agent:1.6"
    assert system["edgeHub"]["settings"]["image"] == "mcr.microsoft.com/azureiotedge-hub:1.6"
    ports = create_options(system["edgeHub"]["settings"])["HostConfig"]["PortBindings"]
    assert {"8883/tcp", "5671/tcp", "443/tcp"} <= set(ports)  # where child devices connect


# -- routes -----------------------------------------------------------------------------------

ROUTE = re.compile(
    r"^FROM (?P<source>/messages/\S*)"
    r"(?: WHERE (?P<condition>.+?))?"
    r" INTO (?P<sink>\$upstream|BrokeredEndpoint\(\"/modules/[\w-]+/inputs/[\w-]+\"\))$"
)
CONDITION = re.compile(r"^(?P<not>NOT )?IS_DEFINED\(\$(?P<name>\w+)\)$")


def routes() -> dict[str, str]:
    hub = manifest()["modulesContent"]["$edgeHub"]["properties.desired"]
    assert hub["schemaVersion"] in ("1.1", "1.2")
    assert hub["storeAndForwardConfiguration"]["timeToLiveSecs"] > 0
    out = hub["routes"]
    return {name: r if isinstance(r, str) else r["route"] for name, r in out.items()}


def delivers(route: str, source: str, system: dict[str, str]) -> str | None:
    """Where ``route`` sends a message from ``source`` with ``system`` properties, or None.
    The subset of edgeHub's route language the template uses, parsed strictly."""
    found = ROUTE.match(route)
    assert found, f"not a route: {route!r}"
    pattern = "^" + re.escape(found["source"]).replace(r"\*", ".*") + "$"
    if not re.match(pattern, source):
        return None
    if found["condition"]:
        condition = CONDITION.match(found["condition"])
        assert condition, f"condition outside the checked subset: {found['condition']!r}"
        defined = condition["name"] in system
        if defined == bool(condition["not"]):
            return None
    return found["sink"]


def test_routes_parse() -> None:
    for name, route in routes().items():
        assert ROUTE.match(route), (name, route)


@pytest.mark.parametrize(
    ("source", "system", "expected"),
    [
        # A child device (each fieldgate device under its own identity) sends telemetry.
        ("/messages/events", {"connectionDeviceId": "boiler-7"}, ["$upstream"]),
        # The module's own output (its audit stream): once upstream, not also as a child's.
        (
            "/messages/modules/fieldgate/outputs/audit",
            {"connectionDeviceId": "edge-1", "connectionModuleId": "fieldgate"},
            ["$upstream"],
        ),
        # Another module's output is not sent upstream by these routes.
        (
            "/messages/modules/other/outputs/out",
            {"connectionDeviceId": "edge-1", "connectionModuleId": "other"},
            [],
        ),
    ],
)
def test_each_message_goes_upstream_once(
    source: str, system: dict[str, str], expected: list[str]
) -> None:
    sinks = [s for r in routes().values() if (s := delivers(r, source, system)) is not None]
    assert sinks == expected


def test_the_route_checker_refuses_a_malformed_route() -> None:
    with pytest.raises(AssertionError):
        delivers(
            "FROM /messages/* WHERE NOT IS_DEFINED($connectionModuleId) INTO upstream", "/", {}
        )
    with pytest.raises(AssertionError):
        delivers(
            "FROM /messages/* WHERE $connectionModuleId = 'x' INTO $upstream", "/messages/a", {}
        )


# -- the module twin ----------------------------------------------------------------------------

BAD_KEY = re.compile(r"[.$ \x00-\x1f\x7f-\x9f]")


def keys(value: object) -> list[str]:
    if isinstance(value, dict):
        return [k for k, v in value.items() for k in [k, *keys(v)]]
    return []


def test_the_module_twin_names_the_config_file() -> None:
    """The twin shape the edge helper defines (fieldgate.config inline, or fieldgate.config_file
    {path, sha256}); twin keys may not hold '.', '$' or spaces, so "fieldgate.config" is the
    path fieldgate -> config."""
    desired = manifest()["modulesContent"]["fieldgate"]["properties.desired"]
    config_file = desired["fieldgate"]["config_file"]
    assert config_file["path"].startswith("/etc/fieldgate/")
    assert config_file["sha256"] == "${FIELDGATE_CONFIG_SHA256}"
    assert not [k for k in keys(desired) if BAD_KEY.search(k)]
