"""Staged config, pure: what a new config changes against the running one, and whether that can
be applied live.

:func:`plan` compares two validated configs (and, optionally, digests of the files they name:
a renewed certificate at the same path is a change) and says, per device, whether it was added,
removed, changed or is unchanged, and per poller task (a Modbus link: ``poll[ID]`` for a device
with its own host, ``link[NAME]`` for a ``[[links]]`` entry; a BLE adapter: ``ble[NAME]``)
whether it must start, stop or restart.

Only ``devices`` and ``links`` are applied live. Every other section (hub, sealing, batching,
secrets, gateway, store, ble, control) is shared by every device or names what the process
opened at its start (the store, the state folder, the sealer's key): a change there is refused
whole, as "needs a restart: field X", and the running config stays as it was. Applying part of
a config would leave the gateway running a config that is in no file and has no hash.

A disabled device is not part of the running set: enabling one adds it, disabling one removes it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.config.models import Config, DeviceConfig

# The sections applied live; every other top-level field needs a restart.
LIVE_SECTIONS = frozenset({"devices", "links"})


@dataclass(frozen=True, slots=True)
class Files:
    """Digests of the contents of files a config names, taken when it was loaded (the I/O is
    :func:`gateway.config.sources.fingerprints`): ``sections`` by field (``hub.ca_file``),
    ``devices`` by device id (its certificate, key and the files of its link)."""

    sections: Mapping[str, str] = field(default_factory=dict)
    devices: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Plan:
    """What applying ``new`` over ``old`` does. Device ids and task names are sorted."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    # Poller tasks (poll[ID], link[NAME], ble[NAME]) to start, stop, restart, leave alone.
    tasks_added: tuple[str, ...] = ()
    tasks_removed: tuple[str, ...] = ()
    tasks_restarted: tuple[str, ...] = ()
    tasks_unchanged: tuple[str, ...] = ()
    # Fields outside the live sections that differ: the plan cannot be applied live.
    restart: tuple[str, ...] = ()

    @property
    def live(self) -> bool:
        return not self.restart

    @property
    def empty(self) -> bool:
        """Nothing to do: the same running set (the config may differ in disabled devices)."""
        return not (self.added or self.removed or self.changed or self.restart) and not (
            self.tasks_added or self.tasks_removed or self.tasks_restarted
        )

    def refusal(self) -> str | None:
        """Why the plan is refused, naming the first field, or None."""
        if not self.restart:
            return None
        more = f" (and {len(self.restart) - 1} more)" if len(self.restart) > 1 else ""
        return f"needs a restart: field {self.restart[0]}{more}"

    def summary(self) -> dict[str, Any]:
        """For the security event and the status file: the ids, compactly."""
        out: dict[str, Any] = {
            "added": list(self.added),
            "removed": list(self.removed),
            "changed": list(self.changed),
            "unchanged": len(self.unchanged),
        }
        if self.restart:
            out["restart"] = list(self.restart)
        return out


def plan(
    old: Config, new: Config, old_files: Files | None = None, new_files: Files | None = None
) -> Plan:
    """Compare the running config ``old`` with ``new``; no I/O."""
    old_files = old_files or Files()
    new_files = new_files or Files()
    restart = tuple(_restart_fields(old, new, old_files, new_files))
    before = _devices(old, old_files)
    after = _devices(new, new_files)
    added = sorted(after.keys() - before.keys())
    removed = sorted(before.keys() - after.keys())
    common = sorted(before.keys() & after.keys())
    changed = [d for d in common if before[d] != after[d]]
    unchanged = [d for d in common if before[d] == after[d]]
    old_tasks = tasks(old)
    new_tasks = tasks(new)
    touched = set(added) | set(removed) | set(changed)
    restarted = []
    kept = []
    for name in sorted(old_tasks.keys() & new_tasks.keys()):
        (old_cfg, old_ids), (new_cfg, new_ids) = old_tasks[name], new_tasks[name]
        if old_cfg != new_cfg or old_ids != new_ids or touched & set(new_ids):
            restarted.append(name)
        else:
            kept.append(name)
    return Plan(
        added=tuple(added),
        removed=tuple(removed),
        changed=tuple(changed),
        unchanged=tuple(unchanged),
        tasks_added=tuple(sorted(new_tasks.keys() - old_tasks.keys())),
        tasks_removed=tuple(sorted(old_tasks.keys() - new_tasks.keys())),
        tasks_restarted=tuple(restarted),
        tasks_unchanged=tuple(kept),
        restart=restart,
    )


def tasks(config: Config) -> dict[str, tuple[Any, tuple[str, ...]]]:
    """Each poller task of ``config``: name -> (what configures it, its device ids in order).

    The names are the gateway's task names: ``poll[ID]`` for a Modbus device with its own host,
    ``link[NAME]`` for a shared link, ``ble[NAME]`` for a BLE adapter."""
    out: dict[str, tuple[Any, tuple[str, ...]]] = {}
    for link, devices in config.modbus_links():
        ids = tuple(d.id for d in devices)
        out[task_name(link.name, devices)] = (link.model_dump(mode="json"), ids)
    adapters: dict[str, list[str]] = {}
    for device in config.devices:
        if device.enabled and device.ble is not None:
            adapters.setdefault(device.ble.adapter, []).append(device.id)
    for name, members in adapters.items():
        out[f"ble[{name}]"] = (None, tuple(members))
    return out


def task_name(link_name: str, devices: list[DeviceConfig]) -> str:
    """A Modbus link's task: ``poll[ID]`` for a device's own host, ``link[NAME]`` for a shared
    link."""
    own = devices[0].modbus is not None and devices[0].modbus.link is None
    return f"poll[{devices[0].id}]" if own else f"link[{link_name}]"


def _devices(config: Config, files: Files) -> dict[str, tuple[Any, ...]]:
    """Each running (enabled) device: what makes it the same device, comparable with ``==``:
    its own section, its shared link's section, and the digest of its files."""
    out: dict[str, tuple[Any, ...]] = {}
    for device in config.devices:
        if not device.enabled:
            continue
        link = None
        if device.modbus is not None and device.modbus.link is not None:
            named = config.link_named(device.modbus.link)
            link = named.model_dump(mode="json") if named is not None else None
        out[device.id] = (device.model_dump(mode="json"), link, files.devices.get(device.id))
    return out


def _restart_fields(old: Config, new: Config, old_files: Files, new_files: Files) -> Iterator[str]:
    a = old.model_dump(mode="json")
    b = new.model_dump(mode="json")
    for key in sorted(a.keys() | b.keys()):
        if key in LIVE_SECTIONS:
            continue
        yield from _differences(a.get(key), b.get(key), key)
    for key in sorted(old_files.sections.keys() | new_files.sections.keys()):
        if old_files.sections.get(key) != new_files.sections.get(key):
            yield f"{key} (the file's contents)"


def _differences(a: Any, b: Any, where: str) -> Iterator[str]:
    """The leaf paths where two JSON values differ: ``hub.port``, ``control.timeout``."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(a.keys() | b.keys()):
            yield from _differences(a.get(key), b.get(key), f"{where}.{key}")
    elif a != b:
        yield where
