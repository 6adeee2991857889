"""Where a new config comes from, and what a staging of it ends as.

One path for every source: a file (SIGHUP, ``fieldgate reload``) or a document (the IoT Edge
module twin's desired properties, the same schema as the TOML file, as JSON) becomes a
:class:`Candidate` — validated by the same models as a start (a refused one raises
:class:`~gateway.core.errors.ConfigError` naming the source and the field), with its SHA-256
(of the file's bytes, or of the document's canonical JSON) and the digests of the files it names.
:meth:`gateway.app.Gateway.stage` takes it from there and answers an :class:`Outcome`, which the
gateway also writes to ``state_dir/config-status.json`` for ``fieldgate reload`` to read.

The seam for other sources (the module twin): ``await gateway.stage(document, "twin")``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gateway.config.loading import validate
from gateway.config.models import Config, DeviceConfig
from gateway.config.staging import Files
from gateway.core.errors import ConfigError

STATUS_FILE = "config-status.json"

Status = Literal["applied", "refused", "rolled-back"]


@dataclass(frozen=True, slots=True)
class Candidate:
    """A validated config, where it came from, its hash, and its files' digests."""

    config: Config
    source: str
    hash: str
    files: Files


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a staging ended: ``applied``, ``refused`` (``field``, ``error``: nothing changed) or
    ``rolled-back`` (``error``: applying failed; the last good config runs)."""

    status: Status
    source: str
    hash: str | None
    error: str | None = None
    field: str | None = None
    plan: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    at: float = dataclasses.field(default_factory=time.time)

    @property
    def applied(self) -> bool:
        return self.status == "applied"

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "hash": self.hash,
            "status": self.status,
            "source": self.source,
            "at": self.at,
            "error": self.error,
        }
        if self.field is not None:
            out["field"] = self.field
        if self.plan:
            out["plan"] = dict(self.plan)
        return out


def file_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def document_hash(document: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a document: sorted keys, no spaces, UTF-8."""
    canonical = json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def from_file(
    path: str | Path, source: str | None = None, *, sha256: str | None = None
) -> Candidate:
    """Read and validate a config file (the same checks as ``fieldgate run``). ``sha256``: the
    digest the file must have (a module twin names a large config by path and SHA-256); a
    file with another one is refused before it is parsed."""
    file = Path(path)
    name = str(file) if source is None else f"{source} ({file})"
    try:
        raw = file.read_bytes()
    except OSError as err:
        raise ConfigError(name, [f"cannot read: {err.strerror}"]) from err
    if sha256 is not None and file_hash(raw) != sha256.lower():
        raise ConfigError(
            name, [f"sha256: the file's SHA-256 is {file_hash(raw)}, not {sha256.lower()}"]
        )
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(name, [f"not valid TOML: {err}"]) from err
    config = validate(data, name, base=file.resolve().parent)
    return Candidate(config, name, file_hash(raw), fingerprints(config))


def from_document(
    document: Mapping[str, Any], source: str, *, base: Path | None = None
) -> Candidate:
    """Validate a config document (relative paths in it are taken from ``base``)."""
    if not isinstance(document, Mapping):
        raise ConfigError(
            source, [f"a config document is an object, not {type(document).__name__}"]
        )
    config = validate(dict(document), source, base=base)
    return Candidate(config, source, document_hash(document), fingerprints(config))


def from_config(config: Config, source: str) -> Candidate:
    """An already validated config (tests, a worker's share): hashed by its canonical JSON."""
    return Candidate(
        config, source, document_hash(config.model_dump(mode="json")), fingerprints(config)
    )


def fingerprints(config: Config) -> Files:
    """Digests of the files a config names: a renewed certificate at the same path changes its
    device; a new CA file or keyring needs a restart. A file that cannot be read digests as
    its error (preflight has refused such a config already; a race is a change)."""
    sections = {
        "hub.ca_file": _digest([config.hub.ca_file]),
        "sealing.keyring": _digest([config.sealing.keyring]),
    }
    if config.secrets.passphrase_file is not None:
        sections["secrets.passphrase_file"] = _digest([config.secrets.passphrase_file])
    devices = {d.id: _digest(_device_files(config, d)) for d in config.devices if d.enabled}
    return Files(sections, devices)


def _device_files(config: Config, device: DeviceConfig) -> list[Path]:
    files = [device.cert, device.key]
    tls: Any = None
    if device.modbus is not None:
        tls = device.modbus.tls
        if device.modbus.link is not None:
            tls = getattr(config.link_named(device.modbus.link), "tls", None)
    if tls is not None:
        files += [p for p in vars(tls).values() if isinstance(p, Path)]
    if device.ble is not None and device.ble.challenge is not None:
        files.append(device.ble.challenge.key_file)
    return files


def _digest(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(str(path).encode() + b"\0")
        try:
            h.update(path.read_bytes())
        except OSError as err:
            h.update(f"unreadable: {err.strerror}".encode())
        h.update(b"\0")
    return h.hexdigest()


def refusal(err: ConfigError) -> tuple[str | None, str]:
    """(field, why) of a refused config's first problem: ``devices[2].points[0].type``."""
    first = err.problems[0] if err.problems else str(err)
    where, sep, why = first.partition(": ")
    if sep and " " not in where:
        return where, why
    return None, first


def write_status(state_dir: Path, outcome: Outcome) -> None:
    """``config-status.json``, replaced whole (a reader never sees half of it)."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = state_dir / STATUS_FILE
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(outcome.as_json(), indent=2) + "\n")
    os.replace(tmp, target)


def read_status(state_dir: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((state_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None
