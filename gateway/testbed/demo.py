"""``fieldgate demo``: everything on one box, and a live view of what the hub receives.

It makes (or reuses) a development PKI in the state folder, starts the local hub stand-in in
this process, the Modbus simulator and the gateway as child processes (as they would run in the
field), and shows per device how the gateway admitted it (or why it quarantined it, from its
security events) and what the hub opened: readings, sequence accounting, envelopes the hub
refused, latency and the latest values. Ctrl-C stops the gateway first (it flushes its
batches); the hub stops once it has opened everything the gateway's store accepted, then the
devices stop, and nothing is left running. BLE peripherals (``--ble``) run behind a simulated
bluetoothd on a private D-Bus, beside the Modbus devices, through the same gateway.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
import tomllib
from pathlib import Path
from typing import Any, BinaryIO

from adapters.ble.sim.bus import SOCKET_NAME
from adapters.ble.sim.run import simulator_argv as ble_argv
from adapters.modbus.sim.run import simulator_argv
from gateway import runtime
from gateway import store as store_mod
from gateway.consumer import SequenceTracker
from gateway.core.errors import FieldgateError
from gateway.enroll import registry_path
from gateway.events import FILE_NAME as EVENTS_FILE
from gateway.events import event_of
from gateway.identity import pki as pki_mod
from gateway.store import auditdb
from gateway.testbed import harness
from gateway.testbed.console import Column, Console, Renderable, stack, styled, table
from gateway.testbed.harness import free_ports
from gateway.testbed.localhub.broker import Broker
from gateway.testbed.localhub.service import DeviceView, HubService

CHILD_GRACE = 15.0
# Seconds a simulator has to write its config (or open its bus).
SIM_READY_WITHIN = 20.0
# Seconds the hub waits, after the gateway stopped, for what the gateway's store accepted.
HUB_CATCH_UP = 15.0
# With this many BLE peripherals or more, the last one is quarantined (a wrong challenge answer).
QUARANTINE_FROM = 2


def admission_text(event: dict[str, Any]) -> str:
    """How a ``device-admitted`` event's device was verified, in a few words."""
    if event.get("transport") == "ble":
        checks = [f"bond {event.get('bond', '?')}"]
        checks.append("challenge passed" if event.get("challenge") == "passed" else "no challenge")
        return " + ".join(checks)
    where = event.get("endpoint", "?")
    verified = event.get("verified")
    if verified == "yes":
        # The fingerprint read matches the enrolled one (fieldgate enroll).
        how = {"fc43": "FC 43", "registers": "registers", "fc43+registers": "FC 43+registers"}
        source = str(event.get("identity_source", "?"))
        return f"{how.get(source, source)} enrolled ({where})"
    if verified == "no":
        return f"UNVERIFIED: identity none ({where})"
    return f"registry binding ({where})"


async def _enroll(config: Path, log: BinaryIO, console: Console) -> None:
    """``fieldgate enroll --yes``: pin each simulated device's FC 43 fingerprint before the
    gateway starts (an operator confirms each one; the demo says yes to all)."""
    enroll = await harness.spawn(["enroll", "--config", str(config), "--yes"], log)
    try:
        async with asyncio.timeout(CHILD_GRACE):
            code = await enroll.wait()
    except TimeoutError:
        await harness.stop(enroll, 1.0, "enroll")
        code = -1
    if code == 0:
        console.print(f"enrolled the Modbus devices' FC 43 fingerprints: {registry_path(config)}")
    else:
        console.print(
            f"fieldgate enroll failed ({code}): see the gateway log; devices stay refused"
        )


class Admissions:
    """The gateway's security events of this run, read from its audit log as it grows: how each
    device was admitted, why one was quarantined, and the unknown devices seen."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Earlier runs' events stay in the log; this run's start after them.
        self._after = self._last_pos()
        self.devices: dict[str, str] = {}
        self.quarantined: dict[str, str] = {}
        self.unknown: dict[str, str] = {}

    def poll(self) -> None:
        if not self.path.exists():
            return
        items, _ = auditdb.read_items(self.path, self._after)
        for pos, line in items:
            self._after = pos
            event = event_of(line)
            if event is not None:
                self.add(event)

    def _last_pos(self) -> int:
        if not self.path.exists():
            return -1
        items, _ = auditdb.read_items(self.path)
        return items[-1][0] if items else -1

    def add(self, event: dict[str, Any]) -> None:
        kind, device = event.get("kind"), event.get("device")
        if kind == "device-admitted" and device:
            self.devices[device] = admission_text(event)
            self.quarantined.pop(device, None)
        elif kind == "device-quarantined" and device:
            self.quarantined[device] = str(event.get("reason", "?"))
            self.devices[device] = f"QUARANTINED: {self.quarantined[device]}"
        elif kind == "device-unknown":
            where = str(event.get("endpoint") or event.get("transport") or "?")
            self.unknown[where] = str(event.get("reason", "?"))


def _table(
    service: HubService,
    admissions: Admissions,
    configured: list[str],
    started: float,
    note: str,
    extra: str = "",
) -> Renderable:
    admissions.poll()
    columns = [
        Column("device", no_wrap=True),
        Column("admission (gateway)", overflow="fold", ratio=1),
        *(
            Column(header, no_wrap=True)
            for header in ("envelopes", "readings", "dups", "gaps", "refused at hub", "latency p50")
        ),
        Column("latest values", no_wrap=True, overflow="ellipsis", ratio=1),
    ]
    rows: list[tuple[Renderable, ...]] = []
    gaps = service.tracker.gaps()
    for device in sorted({*configured, *service.devices, *admissions.devices}):
        view = service.devices.get(device, DeviceView())
        holes = sum(len(g) for (d, _), g in gaps.items() if d == device)
        lat = f"{statistics.median(view.latencies_ms):.0f} ms" if view.latencies_ms else "-"
        values = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(view.last.items()))
        admission = admissions.devices.get(device, "waiting")
        rows.append(
            (
                device,
                styled(admission, "bold red" if device in admissions.quarantined else ""),
                str(view.envelopes),
                str(view.readings),
                str(view.duplicates),
                str(holes),
                str(view.refused),
                lat,
                values,
            )
        )
    title = "IoT Hub stand-in: what arrived, opened and checked"
    elapsed = time.time() - started
    total = sum(v.readings for v in service.devices.values())
    lines = [styled(f"{total} readings in {elapsed:.0f} s. {note}")]
    for device, reason in sorted(admissions.quarantined.items()):
        lines.append(styled(f"quarantined: {device}: {reason}", "bold red"))
    for where, reason in sorted(admissions.unknown.items()):
        lines.append(styled(f"unknown device at {where}: {reason}", "yellow"))
    if extra:
        lines.append(styled(extra))
    return stack(table(title, columns, rows, expand=True), *lines)


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


async def demo(
    state: Path,
    *,
    devices: int,
    points: int,
    ble: int,
    duration: float | None,
    stop: asyncio.Event,
) -> int:
    state.mkdir(parents=True, exist_ok=True)
    pki_dir = state / "pki"
    if not (pki_dir / "root.pem").exists():
        pki_mod.init(pki_dir)
    hub_port = free_ports(1)
    first_port = free_ports(devices)
    while first_port <= hub_port < first_port + devices:
        first_port = free_ports(devices)
    config = state / "gateway.toml"
    logs = state / "logs"
    logs.mkdir(exist_ok=True)
    sim_args = simulator_argv(
        devices=devices,
        port=first_port,
        config=config,
        pki=pki_dir,
        hub_port=hub_port,
        state_dir=state / "gateway",
        # Each device shows FC 43 identity objects; the demo enrolls them (below).
        extra=("--points", str(points), "--period", "0.5", "--identity", "fc43"),
    )
    bus_dir = state / "ble-bus"
    ble_args = ble_argv(
        devices=ble,
        bus_dir=bus_dir,
        config=config,
        pki=pki_dir,
        hub_port=hub_port,
        state_dir=state / "gateway",
        # One peripheral with a private address (found by its app id), values twice a second;
        # --merge adds them to the Modbus devices' config. The last one answers the challenge
        # wrongly (quarantined), and one advertiser is not allow-listed (unknown).
        extra=(
            "--rpa",
            "1",
            "--rate",
            "2",
            "--poll-period",
            "5",
            "--merge",
            "--unknown",
            "1",
            *(("--set", f"ble-{ble}:hmac=wrong") if ble >= QUARANTINE_FROM else ()),
        ),
    )
    security = ""
    if ble < QUARANTINE_FROM:
        security = (
            "No quarantined device is shown: that one is a BLE peripheral "
            f"(--ble {QUARANTINE_FROM} or more)."
        )
    console = Console()
    console.print(f"state folder: {state.resolve()}  (config: {config})")
    # persist: what the broker queued for the hub service survives the broker's stop, as in IoT
    # Hub; with "persistence false" anything still queued at a stop became a gap for good.
    async with Broker(
        pki_mod.Pki(pki_dir), port=hub_port, log_path=logs / "mosquitto.log", persist=state / "hub"
    ):
        service = HubService(
            pki_mod.Pki(pki_dir), host="127.0.0.1", port=hub_port, record=state / "hub-record.jsonl"
        )
        hub_stop = asyncio.Event()
        with (
            open(logs / "simulator.log", "ab") as sim_log,
            open(logs / "ble-simulator.log", "ab") as ble_log,
            open(logs / "gateway.log", "ab") as gw_log,
        ):
            sim = await harness.spawn(sim_args, sim_log)
            gateway = ble_sim = None
            try:
                async with asyncio.TaskGroup() as tg:
                    # The hub side subscribes before the gateway starts: what the gateway sends
                    # first (a backlog from an earlier run) must not meet a broker with no
                    # subscription to queue it for.
                    tg.create_task(service.run(hub_stop), name="hub-service")
                    try:
                        await harness.wait_for_file(config, sim, SIM_READY_WITHIN)
                        if ble:
                            ble_sim = await harness.spawn(ble_args, ble_log)
                            # It writes the config first, then opens its bus.
                            await harness.wait_for_file(
                                bus_dir / SOCKET_NAME, ble_sim, SIM_READY_WITHIN
                            )
                        async with asyncio.timeout(CHILD_GRACE):
                            await service.connected.wait()
                        await _enroll(config, gw_log, console)
                        events = Admissions(state / "gateway" / EVENTS_FILE)
                        gateway = await harness.spawn(["run", "--config", str(config)], gw_log)
                        store = state / "gateway" / "store.db"
                        view = _View(
                            service,
                            events,
                            _device_ids(config),
                            security,
                        )
                        missing = await _show(view, gateway, store, console, logs, duration, stop)
                        if missing:
                            console.print(
                                f"the hub did not receive {missing} accepted readings within "
                                f"{HUB_CATCH_UP:.0f} s",
                                style="bold red",
                            )
                    finally:
                        hub_stop.set()
                stop.set()
            finally:
                if gateway is not None:
                    await harness.stop(gateway, CHILD_GRACE, "gateway")
                await harness.stop(sim, CHILD_GRACE, "simulator")
                if ble_sim is not None:
                    await harness.stop(ble_sim, CHILD_GRACE, "BLE simulator")
                service.close()
    code = gateway.returncode if gateway is not None else 1
    command = Path(sys.executable).parent / "fieldgate"
    console.print()
    console.print(
        f"gateway exit code {code}; logs in {logs}; record in {state / 'hub-record.jsonl'}\n"
        f"read it with: {command} open {state / 'hub-record.jsonl'} --pki {pki_dir}",
        soft_wrap=True,
    )
    return 0 if code == 0 else 1


class _View:
    """What the live table shows: the hub's side, the gateway's admissions, the config."""

    def __init__(
        self, service: HubService, admissions: Admissions, configured: list[str], extra: str
    ) -> None:
        self.service = service
        self.admissions = admissions
        self.configured = configured
        self.extra = extra
        self.started = time.time()

    def render(self, note: str) -> Renderable:
        return _table(
            self.service, self.admissions, self.configured, self.started, note, self.extra
        )


def _device_ids(config: Path) -> list[str]:
    try:
        doc = tomllib.loads(config.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return []
    return [str(d.get("id")) for d in doc.get("devices", []) if d.get("id")]


async def _show(
    view: _View,
    gateway: asyncio.subprocess.Process,
    store: Path,
    console: Console,
    logs: Path,
    duration: float | None,
    stop: asyncio.Event,
) -> int:
    """The live view, until Ctrl-C, ``duration`` or the gateway's exit; then the gateway stops
    and the hub catches up. Returns how many accepted readings the hub did not get. On a
    terminal the table is live; otherwise rich prints it once, at the end."""
    note = "Ctrl-C stops." if duration is None else f"Stops after {duration:.0f} s."
    with console.live(view.render(note)) as live:
        deadline = None if duration is None else time.monotonic() + duration
        while not stop.is_set():
            if gateway.returncode is not None:
                note = f"gateway exited with {gateway.returncode}: see {logs}"
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            try:
                async with asyncio.timeout(0.5):
                    await stop.wait()
            except TimeoutError:
                pass
            live.update(view.render(note))
        live.update(view.render("stopping: the gateway flushes..."))
        await harness.stop(gateway, CHILD_GRACE, "gateway")
        # The hub outlives the gateway's flush: it stops once it has opened every reading the
        # gateway's store accepted, or after HUB_CATCH_UP.
        missing = await _catch_up(view.service, store)
        live.update(view.render("stopped."))
    return missing


def hub_missing(
    accepted: dict[str, int],
    boot_id: str | None,
    tracker: SequenceTracker,
    dropped: dict[str, int] | None = None,
) -> int:
    """Readings the store accepted (sequence numbers 0 .. next-1 of its boot, per device) that
    the hub has not opened yet, less those its policy dropped (``dropped``: per device)."""
    dropped = dropped or {}
    if boot_id is None:
        return 0
    missing = 0
    for device, next_seq in accepted.items():
        stream = tracker.streams.get((device, boot_id))
        seen = stream.count_below(next_seq) if stream is not None else 0
        # Readings the store's policy dropped will never arrive: not worth waiting for.
        missing += max(0, next_seq - seen - dropped.get(device, 0))
    return missing


async def _catch_up(service: HubService, store: Path) -> int:
    try:
        accepted = store_mod.accepted(store)
        report = store_mod.status(store) if accepted else None
        boot_id = report["boot_id"] if report else None
        dropped = {
            device: int(row["dropped"]["readings"])
            for device, row in (report["devices"] if report else {}).items()
            if row.get("dropped")
        }
    except FieldgateError as err:
        print(f"cannot read the gateway's store: {err}", file=sys.stderr)
        return 0
    try:
        async with asyncio.timeout(HUB_CATCH_UP):
            while hub_missing(accepted, boot_id, service.tracker, dropped):
                service.opened.clear()
                await service.opened.wait()
    except TimeoutError:
        pass
    return hub_missing(accepted, boot_id, service.tracker, dropped)


def run_demo(state: Path, *, devices: int, points: int, ble: int, duration: float | None) -> int:
    config = state / "gateway.toml"
    if config.exists():
        os.remove(config)
    (state / "ble-bus" / SOCKET_NAME).unlink(missing_ok=True)

    async def main(stop: asyncio.Event) -> int:
        return await demo(
            state, devices=devices, points=points, ble=ble, duration=duration, stop=stop
        )

    return int(runtime.run(main))
