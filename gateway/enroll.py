"""Enrolment: pin each Modbus device's fingerprint, confirmed by the operator (trust on first
use), in a registry file next to the config.

``fieldgate enroll --config gateway.toml`` connects to every enabled Modbus device that has an
identity method, reads its fingerprint (:mod:`adapters.modbus.identity`), prints it, and asks
per device whether to pin it (``--yes``: without asking). A device enrolled before whose
fingerprint changed shows old against new and needs the same confirmation. The pinned values
are written atomically (a temporary file, fsync, rename, fsync of the folder) to
``gateway.enrolled.json`` beside ``gateway.toml``.

The gateway loads that file at start (:func:`load_registry`): a malformed one refuses the start
naming the file and the field; a missing one means nothing is enrolled, so every device with
an identity method is refused "not enrolled" until it is. The file is data, not secrets: a
fingerprint is what the device tells anyone who asks, and the operator may read it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.core.errors import EXIT_FAILED, ConfigError, FieldgateError

if TYPE_CHECKING:  # the parser is built for every verb: pydantic loads only where needed
    from adapters.modbus.config import ModbusLinkConfig
    from gateway.config import Config, DeviceConfig

SUFFIX = ".enrolled.json"
FORMAT = "fieldgate-enrolment"
VERSION = 1
MAX_VALUE = 256  # characters of one pinned value, at most (the collector keeps 128)


@dataclass(frozen=True, slots=True)
class Enrolled:
    """One device's pinned fingerprint."""

    fingerprint: dict[str, str]
    endpoint: str  # where it was read (shown, not checked: the config binds the endpoint)
    enrolled_at: str


@dataclass(frozen=True, slots=True)
class Enrolment:
    """What the gateway starts with: the pinned fingerprints, and the command that adds more."""

    devices: Mapping[str, Enrolled]
    path: Path
    config_path: str

    @property
    def hint(self) -> str:
        return f"fieldgate enroll --config {self.config_path}"

    def pinned(self, device_id: str) -> dict[str, str] | None:
        entry = self.devices.get(device_id)
        return None if entry is None else entry.fingerprint


def registry_path(config_path: str | Path) -> Path:
    """``gateway.toml`` -> ``gateway.enrolled.json``, in the same folder."""
    path = Path(config_path)
    return path.with_name(path.stem + SUFFIX)


def load_for(config_path: str | Path) -> Enrolment:
    path = registry_path(config_path)
    return Enrolment(load_registry(path), path, str(config_path))


# -- the file --


def load_registry(path: Path) -> dict[str, Enrolled]:
    """The pinned fingerprints in ``path`` ({} if there is no such file), or
    :class:`ConfigError` naming the file and each bad field."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise ConfigError(str(path), [f"cannot read: {err.strerror}"]) from err
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(str(path), [f"not valid JSON: {err}"]) from err
    problems: list[str] = []
    out = parse_registry(doc, problems)
    if problems:
        raise ConfigError(str(path), problems)
    return out


def parse_registry(doc: Any, problems: list[str]) -> dict[str, Enrolled]:
    """Pure: a registry document's entries; what is wrong goes to ``problems``."""
    if not isinstance(doc, dict):
        problems.append("the file must hold a JSON object")
        return {}
    if doc.get("format") != FORMAT:
        problems.append(f"format: must be {FORMAT!r} (got {doc.get('format')!r})")
    if doc.get("version") != VERSION:
        problems.append(f"version: must be {VERSION} (got {doc.get('version')!r})")
    devices = doc.get("devices")
    if not isinstance(devices, dict):
        problems.append("devices: must be an object of device id -> entry")
        return {}
    out: dict[str, Enrolled] = {}
    for device_id, entry in devices.items():
        where = f"devices.{device_id}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be an object")
            continue
        fingerprint = entry.get("fingerprint")
        if not isinstance(fingerprint, dict) or not fingerprint:
            problems.append(f"{where}.fingerprint: must be a non-empty object of name -> text")
            continue
        bad = [
            k
            for k, v in fingerprint.items()
            if not isinstance(v, str) or not k or len(v) > MAX_VALUE
        ]
        if bad:
            problems.append(
                f"{where}.fingerprint.{bad[0]}: must be text of at most {MAX_VALUE} characters"
            )
            continue
        endpoint, at = entry.get("endpoint", ""), entry.get("enrolled_at", "")
        if not isinstance(endpoint, str) or not isinstance(at, str):
            problems.append(f"{where}: endpoint and enrolled_at must be text")
            continue
        out[device_id] = Enrolled(dict(fingerprint), endpoint, at)
    return out


def render_registry(devices: Mapping[str, Enrolled]) -> bytes:
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "devices": {
            device_id: {
                "endpoint": e.endpoint,
                "enrolled_at": e.enrolled_at,
                "fingerprint": e.fingerprint,
            }
            for device_id, e in sorted(devices.items())
        },
    }
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()


def write_registry(path: Path, devices: Mapping[str, Enrolled]) -> None:
    """Atomically: the old file or the new one, never half of either, even on power loss."""
    data = render_registry(devices)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


# -- the verb --


def enrollable(cfg: Config, only: list[str]) -> list[DeviceConfig]:
    """The devices ``fieldgate enroll`` reads: enabled, Modbus, with an identity method."""
    known = {d.id for d in cfg.devices}
    missing = [d for d in only if d not in known]
    if missing:
        raise ConfigError("--device", [f"{missing[0]!r}: no such device in the config"])
    return [
        d
        for d in cfg.devices
        if d.enabled
        and d.modbus is not None
        and d.identity is not None
        and d.identity.verified
        and (not only or d.id in only)
    ]


async def read_fingerprints(
    cfg: Config, devices: list[DeviceConfig]
) -> dict[str, tuple[dict[str, str], str]]:
    """Each device's fingerprint (values, and how it was read), or an error text as values
    ``{}`` with the reason. One connection per link, as the gateway keeps (a serial port, or a
    serial-to-Ethernet gateway that takes one connection), its units read one after another;
    the links concurrently."""
    from adapters.modbus.identity import collect_fingerprint, comparable
    from adapters.modbus.link import UnitSource
    from adapters.modbus.security import ModbusTlsError
    from adapters.modbus.security import client_context as modbus_tls_context
    from adapters.modbus.transport import ModbusTransport, Target, WrongAnswer

    wanted = {d.id for d in devices}

    def ignore(_cause: str, _target: Target | None) -> None:
        pass  # a wrong answer fails its read, which says so below

    async def one_link(
        link: ModbusLinkConfig, members: list[DeviceConfig]
    ) -> dict[str, tuple[dict[str, str], str]]:
        out: dict[str, tuple[dict[str, str], str]] = {}
        tls = getattr(link, "tls", None)
        left = list(members)
        try:
            context = None if tls is None else modbus_tls_context(tls, cfg.secrets.passphrase())
            while left:
                # A stream left out of step (a truncated answer on TCP) is reconnected before
                # the next unit is read, as the gateway does: its late bytes are not the next
                # unit's answer.
                async with ModbusTransport(link, ignore, context) as transport:
                    while left:
                        device = left.pop(0)
                        assert device.modbus is not None and device.identity is not None
                        target = Target(device.id, device.modbus.unit, device.endpoint)
                        try:
                            found = await collect_fingerprint(
                                UnitSource(transport, target), device.identity
                            )
                        except WrongAnswer as err:
                            out[device.id] = {}, str(err)
                            if err.resync:
                                break
                            continue
                        except FieldgateError as err:
                            out[device.id] = {}, str(err)
                            continue
                        if found.refusal is not None:
                            out[device.id] = {}, found.refusal
                            continue
                        how = found.notes.get("identity_source", "")
                        if "fc43" in found.notes:
                            how += f" (FC 43 answered {found.notes['fc43']})"
                        out[device.id] = comparable(found.values), how
        except (FieldgateError, ModbusTlsError) as err:
            for device in members:
                out.setdefault(device.id, ({}, str(err)))
        return out

    groups = [
        (link, [d for d in members if d.id in wanted]) for link, members in cfg.modbus_links()
    ]
    results: dict[str, tuple[dict[str, str], str]] = {}
    for part in await asyncio.gather(*(one_link(k, m) for k, m in groups if m)):
        results.update(part)
    return {d.id: results.get(d.id, ({}, "not read")) for d in devices}


def decide(
    device: DeviceConfig,
    seen: dict[str, str],
    how: str,
    old: Enrolled | None,
    confirm: Callable[[str], bool],
    say: Callable[[str], None],
) -> Enrolled | None:
    """One device: show what was read (and what was pinned), ask; the entry to pin, or None."""
    endpoint = device.endpoint
    say(f"{device.id} at {endpoint}: read by {how}")
    if old is not None and old.fingerprint == seen:
        say("  enrolled already, unchanged")
        return None
    width = max(len(k) for k in seen)
    if old is None:
        for name, value in seen.items():
            say(f"  {name:<{width}}  {value}")
        question = f"Pin this fingerprint for {device.id}? [y/N] "
    else:
        say(f"  CHANGED since it was enrolled ({old.enrolled_at}):")
        names = sorted(set(old.fingerprint) | set(seen))
        width = max(len(k) for k in names)
        for name in names:
            was, now = old.fingerprint.get(name), seen.get(name)
            mark = " " if was == now else "*"
            say(f" {mark}{name:<{width}}  {_shown(was)}  ->  {_shown(now)}")
        question = f"Replace the enrolled fingerprint of {device.id}? [y/N] "
    if not confirm(question):
        say(f"  {device.id}: not enrolled")
        return None
    return Enrolled(dict(seen), endpoint, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def _shown(value: str | None) -> str:
    return "(nothing)" if value is None else repr(value)


def _ask(question: str) -> bool:
    try:
        answer = input(question)
    except EOFError:  # no terminal and no --yes: nobody confirmed
        print()
        return False
    return answer.strip().lower() in ("y", "yes")


def cmd_enroll(args: argparse.Namespace) -> int:
    from gateway import config as config_mod
    from gateway import runtime

    cfg = config_mod.load(args.config)
    path = registry_path(args.config)
    current = load_registry(path)
    devices = enrollable(cfg, list(args.device or ()))
    if not devices:
        print(
            'nothing to enroll: no enabled Modbus device has an identity method (identity = "none" '
            "devices cannot be verified)"
        )
        return 0

    async def main(_stop: asyncio.Event) -> dict[str, tuple[dict[str, str], str]]:
        return await read_fingerprints(cfg, devices)

    read = runtime.run(main)
    confirm = (lambda _q: True) if args.yes else _ask
    merged = dict(current)
    changed = failed = 0
    for device in devices:
        seen, how = read[device.id]
        if not seen:
            print(f"{device.id} at {device.endpoint}: cannot read its identity: {how}")
            failed += 1
            continue
        entry = decide(device, seen, how, current.get(device.id), confirm, print)
        if entry is not None:
            merged[device.id] = entry
            changed += 1
        sys.stdout.flush()
    if changed:
        write_registry(path, merged)
        print(f"wrote {path}: {changed} enrolled now, {len(merged)} in all")
    else:
        print(f"{path}: nothing changed")
    if failed:
        print(f"{failed} of {len(devices)} devices could not be read", file=sys.stderr)
        return EXIT_FAILED
    return 0


def add_parser(verbs: Any) -> None:
    enroll = verbs.add_parser(
        "enroll",
        help="read each Modbus device's fingerprint and pin it (confirmed per device)",
    )
    enroll.add_argument("--config", required=True, help="gateway TOML file")
    enroll.add_argument("--yes", action="store_true", help="pin without asking")
    enroll.add_argument(
        "--device", action="append", metavar="ID", help="only this device (repeatable)"
    )
    enroll.set_defaults(func=cmd_enroll)
