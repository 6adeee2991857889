"""What every device simulator shares: the gateway config around the devices (hub, sealing,
secrets, state), device certificates, merging into a config, the command line that starts a
simulator, and running one until it is stopped."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path
from typing import Any

from gateway import runtime
from gateway.config import render_toml
from gateway.identity import pki as pki_mod
from gateway.identity.pki import DEFAULT_KEY_ID, Pki


def skeleton(
    *,
    pki_dir: Path,
    hub_port: int,
    hub_host: str = "127.0.0.1",
    state_dir: Path | None = None,
    max_age: float = 1.0,
    max_bytes: int = 4000,
) -> dict[str, Any]:
    """A gateway config without devices, for a stand-in hub and the PKI in ``pki_dir``."""
    pki = Pki(pki_dir.resolve())
    state = str((state_dir or pki_dir.parent / "gateway").resolve())
    gateway: dict[str, Any] = {"state_dir": state}
    if pki.root_cert.exists():
        # The gateway's own identity: it signs the audit log and sends it as its own stream.
        gateway = {
            "id": pki_mod.ensure_gateway(pki.root),
            "cert": str(pki.gateway_cert),
            "key": str(pki.gateway_key),
            "state_dir": state,
        }
    return {
        "hub": {
            "hostname": "localhost",
            "address": hub_host,
            "port": hub_port,
            "ca_file": str(pki.root_cert),
        },
        "sealing": {"keyring": str(pki.keyring), "key_id": DEFAULT_KEY_ID},
        "batching": {"max_bytes": max_bytes, "max_age": max_age},
        "secrets": {"passphrase_file": str(pki.passphrase_file)},
        "gateway": gateway,
        "devices": [],
    }


def device_files(pki_dir: Path, device_id: str) -> dict[str, str]:
    pki = Pki(pki_dir.resolve())
    return {"cert": str(pki.device_cert(device_id)), "key": str(pki.device_key(device_id))}


def write(doc: dict[str, Any], target: Path, pki_dir: Path, *, merge: bool = False) -> Path:
    """Write ``doc``; with ``merge``, keep the devices (and sections) ``target`` already has,
    replacing those with the same ids. Issues certificates for devices that have none yet."""
    if merge and target.exists():
        old = tomllib.loads(target.read_text())
        ids = {d["id"] for d in doc["devices"]}
        kept = [d for d in old.get("devices", []) if d.get("id") not in ids]
        doc = {
            **old,
            **{k: v for k, v in doc.items() if k != "devices"},
            "devices": kept + doc["devices"],
        }
    pki = pki_mod.Pki(pki_dir)
    if pki.root_cert.exists():
        missing = [d["id"] for d in doc["devices"] if not pki.device_cert(d["id"]).exists()]
        if missing:
            pki_mod.issue(pki_dir, missing)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_toml(doc))
    return target


def argv(
    kind: str,
    devices: int,
    config: Path,
    pki: Path,
    hub_port: int,
    state_dir: Path,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """``fieldgate simulate KIND`` arguments that also write the matching gateway config."""
    return [
        "simulate",
        kind,
        "--devices",
        str(devices),
        "--write-config",
        str(config),
        "--pki",
        str(pki),
        "--hub-port",
        str(hub_port),
        "--state-dir",
        str(state_dir),
        *extra,
    ]


def serve(main: runtime.Main, what: str) -> int:
    """Run a simulator until SIGINT/SIGTERM; 1 with a message if it cannot start (``what``)."""
    try:
        runtime.run(main)
    except OSError as err:
        print(f"fieldgate: {what}: {err}", file=sys.stderr)
        return 1
    return 0
