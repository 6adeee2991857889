"""Tamper signals: what changed on the box since the last run, and what changes while it runs.

Each signal is an audit record (kind ``tamper-...``) and shows in the gateway's status. At start
(:func:`start_signals`, against the baselines the audit log kept from the last run):

- ``tamper-config-changed``: the config's digest differs (which config ran is recorded by
  digest in every ``gateway-started`` record);
- ``tamper-code-changed``: a hash of fieldgate's installed files (``gateway/``, ``adapters/``)
  differs, naming the files added, removed or changed;
- ``tamper-store-reset``: the store's boot id differs (the file was replaced, moved aside or
  reset);
- ``tamper-clock-behind``: the wall clock is earlier than the last record's time.

While it runs: ``tamper-clock-jump`` (:class:`ClockWatch`: wall time against monotonic time),
``tamper-input`` (:class:`TamperInputs`: a device's enclosure switch; :class:`TamperFiles`: a
file or GPIO value on the box), and the device identity changes the Modbus and BLE checks record
(``device-quarantined`` with the fingerprint that changed).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.core.readings import Scan

META_CONFIG = "config_digest"
META_CODE = "code_digest"
META_MANIFEST = "code_manifest"
META_STORE_BOOT = "store_boot"
META_CERTS = "certificates"
NAMES_SHOWN = 20  # files named per list in a code-changed record

Record = Callable[..., None]  # SecurityEvents.record(kind, device, reason, **fields)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config_digest(config: Any) -> str:
    """The digest of a validated config's values (:func:`gateway.config.sources.from_config`),
    for a gateway that was not told the hash of what it loaded."""
    from gateway.config import sources

    return sources.from_config(config, "config").hash


def code_roots() -> list[Path]:
    import adapters
    import gateway

    return [Path(gateway.__file__).parent, Path(adapters.__file__).parent]


def code_manifest(roots: Iterable[Path]) -> dict[str, str]:
    """``package/relative/path`` -> SHA-256 of every file fieldgate runs from (no caches)."""
    out: dict[str, str] = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if "__pycache__" in path.parts or not path.is_file() or path.suffix == ".pyc":
                continue
            name = f"{root.name}/{path.relative_to(root).as_posix()}"
            out[name] = digest(path.read_bytes())
    return out


def manifest_digest(manifest: Mapping[str, str]) -> str:
    return digest(json.dumps(dict(sorted(manifest.items())), separators=(",", ":")).encode())


def manifest_changes(old: Mapping[str, str], new: Mapping[str, str]) -> dict[str, Any]:
    changed = sorted(k for k in old.keys() & new.keys() if old[k] != new[k])
    added = sorted(new.keys() - old.keys())
    removed = sorted(old.keys() - new.keys())
    return {
        "changed": changed[:NAMES_SHOWN],
        "added": added[:NAMES_SHOWN],
        "removed": removed[:NAMES_SHOWN],
        "counts": {"changed": len(changed), "added": len(added), "removed": len(removed)},
    }


def certificate_digests(files: Mapping[str, Path]) -> dict[str, str]:
    """Identity -> SHA-256 of its certificate file (an unreadable one is left out: the start
    checks refuse it)."""
    out = {}
    for name, path in files.items():
        try:
            out[name] = digest(path.read_bytes())
        except OSError:
            continue
    return out


def certificate_changes(
    meta: Mapping[str, str], now: Mapping[str, str]
) -> list[tuple[str, str, str]]:
    """(identity, old digest, new digest) for each certificate replaced since the last run
    (issued anew or renewed); one seen for the first time is not a change."""
    try:
        old = json.loads(meta.get(META_CERTS, "{}"))
    except ValueError:
        old = {}
    return [(k, old[k], v) for k, v in sorted(now.items()) if k in old and old[k] != v]


@dataclass(frozen=True)
class Baseline:
    """What this run is, for the next run to compare with."""

    config: str
    code: str
    manifest: dict[str, str]
    store_boot: str | None
    now: float


def start_signals(
    meta: Mapping[str, str],
    now: Baseline,
    last_ts: float | None,
    *,
    config_from_cloud: bool = False,
) -> list[tuple[str, str, dict[str, Any]]]:
    """The tamper signals of a start: (kind, reason, details), pure. ``config_from_cloud``:
    the config came from the module twin (IoT Hub's authenticated channel), so a new one is a
    ``config-changed`` record, not a tamper signal."""
    out: list[tuple[str, str, dict[str, Any]]] = []
    old_config = meta.get(META_CONFIG)
    if old_config is not None and old_config != now.config:
        out.append(
            (
                "config-changed" if config_from_cloud else "tamper-config-changed",
                "the config differs from the last run's"
                + (" (from the module twin)" if config_from_cloud else ""),
                {"old": old_config, "new": now.config},
            )
        )
    old_code = meta.get(META_CODE)
    if old_code is not None and old_code != now.code:
        try:
            old_manifest = json.loads(meta.get(META_MANIFEST, "{}"))
        except ValueError:
            old_manifest = {}
        out.append(
            (
                "tamper-code-changed",
                "fieldgate's installed files differ from the last run's",
                {"old": old_code, "new": now.code, **manifest_changes(old_manifest, now.manifest)},
            )
        )
    old_boot = meta.get(META_STORE_BOOT)
    if old_boot is not None and now.store_boot is not None and old_boot != now.store_boot:
        out.append(
            (
                "tamper-store-reset",
                "the store is not the one of the last run (replaced, moved aside or reset)",
                {"old_boot": old_boot, "new_boot": now.store_boot},
            )
        )
    if last_ts is not None and now.now < last_ts:
        out.append(
            (
                "tamper-clock-behind",
                "the wall clock is earlier than the last audit record",
                {"last_record_ts": last_ts, "now": now.now, "behind": round(last_ts - now.now, 3)},
            )
        )
    return out


def baseline_meta(now: Baseline) -> dict[str, str]:
    meta = {
        META_CONFIG: now.config,
        META_CODE: now.code,
        META_MANIFEST: json.dumps(dict(sorted(now.manifest.items())), separators=(",", ":")),
    }
    if now.store_boot is not None:
        meta[META_STORE_BOOT] = now.store_boot
    return meta


@dataclass
class ClockWatch:
    """Wall time against monotonic time: a step of more than ``threshold`` seconds between two
    checks is a jump (an NTP step is small; a hand-set clock or a faked one is not)."""

    threshold: float
    wall: Callable[[], float] = time.time
    mono: Callable[[], float] = time.monotonic
    _last: tuple[float, float] | None = None

    def check(self) -> float | None:
        """The jump since the last check in seconds (positive: forward), or None."""
        wall, mono = self.wall(), self.mono()
        last, self._last = self._last, (wall, mono)
        if last is None:
            return None
        jump = (wall - last[0]) - (mono - last[1])
        return jump if abs(jump) > self.threshold else None


@dataclass
class _Input:
    normal: Any
    tripped: bool = False


@dataclass
class TamperInputs:
    """Devices' tamper points: a reading other than ``normal`` trips the input, a normal one
    after that clears it; each transition is a signal, a repeated value is not."""

    inputs: dict[str, dict[str, _Input]] = field(default_factory=dict)

    @classmethod
    def of(cls, devices: Iterable[tuple[str, Sequence[tuple[str, Any]]]]) -> TamperInputs:
        return cls({d: {p: _Input(n) for p, n in points} for d, points in devices if points})

    def check(self, scan: Scan) -> list[tuple[str, str, Any, bool]]:
        """(device, point, value, tripped) for each transition this scan shows."""
        watched = self.inputs.get(scan.device_id)
        if watched is None or scan.values is None:
            return []
        out = []
        for name, value in zip(scan.names, scan.values, strict=False):
            state = watched.get(name)
            if state is None or value is None:
                continue
            tripped = bool(value) != bool(state.normal)
            if tripped != state.tripped:
                state.tripped = tripped
                out.append((scan.device_id, name, value, tripped))
        return out

    def tripped(self) -> list[str]:
        return [
            f"{d}.{p}" for d, points in self.inputs.items() for p, s in points.items() if s.tripped
        ]


@dataclass
class _File:
    name: str
    path: Path
    normal: str
    state: str = "unknown"  # normal, tripped, unreadable


@dataclass
class TamperFiles:
    """Files or GPIO values on the box; read every ``tamper_interval``."""

    files: list[_File] = field(default_factory=list)

    @classmethod
    def of(cls, items: Iterable[tuple[str, Path, str]]) -> TamperFiles:
        return cls([_File(n, p, v) for n, p, v in items])

    def check(self) -> list[tuple[str, str, str | None]]:
        """(name, new state, value read) for each file whose state changed."""
        out = []
        for f in self.files:
            try:
                value: str | None = f.path.read_text(errors="replace").strip()
            except OSError:
                value = None
            state = (
                "unreadable" if value is None else ("normal" if value == f.normal else "tripped")
            )
            if state != f.state:
                first = f.state == "unknown"
                f.state = state
                if not (first and state == "normal"):
                    out.append((f.name, state, value))
        return out

    def tripped(self) -> list[str]:
        return [f.name for f in self.files if f.state in ("tripped", "unreadable")]
