"""Simulated Modbus TCP devices: pymodbus servers with changing registers and faults.

Each simulated device listens on its own loopback port, as a real device on its own IP would.
Its values are a pure function of (point, time step), :func:`value_at`, so a test can compute
what a device held when a reading was taken and compare exactly. Values change every
``step`` seconds: ramps, sines with noise, counters and toggling bits.

Faults, per device (``--fault dev-3=dead``):

- ``dead``: accepts connections and requests, never answers (the gateway times out);
- ``slow:SECONDS``: answers every request after a delay;
- ``exception:CODE``: answers every read with a Modbus exception code;
  ``exception:CODE:N`` only the first N requests (a PLC that boots, then answers);
- ``down``: no listener at all (connection refused);
- ``crc:N``: on an RTU bus (:mod:`adapters.modbus.sim.bus`), every Nth answer leaves with a
  corrupted CRC (Modbus TCP has no CRC: there it changes nothing).

On a simulated bus a ``dead`` or ``down`` unit is simply silent, as on a real one.

Quirks of real maps, per device (:class:`DeviceSpec` fields, or ``fieldgate simulate modbus``
options), counted in :attr:`SimulatedDevice.exceptions`:

- ``holes``: (table, address) pairs that answer exception 02 to any read or write touching them;
- ``max_registers``: a read of more registers (or bits) answers exception 03;
- ``busy_every``: every Nth request answers exception 06 (busy).

Identity, per device (see :class:`Persona`): FC 43 objects (vendor, product code, revision and
regular objects, one serial number among them), the same serial in holding registers at
``serial_address``, ``fc43_exception`` to answer FC 43 with exception 01 (a device without
it), and :meth:`SimulatedFleet.swap`: two devices trade places at run time, identity and
values, and their current connections drop, as when two units are swapped on site.

The pymodbus server itself is set up in :mod:`adapters.modbus.sim.server`, the simulator's one
module that imports pymodbus; this module decides what the devices hold and how they misbehave.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.modbus.config import REGISTER_WIDTH, Point
from adapters.modbus.registers import encode_value, plan_reads
from adapters.modbus.sim.server import DeviceServer, TlsDeviceServer, server_context
from gateway.testbed.simconfig import device_files, skeleton

TABLE_SIZE = 2048  # registers (or bits) per table of a simulated device
_FC_TABLE = {
    1: "coil",
    5: "coil",
    15: "coil",
    2: "discrete",
    3: "holding",
    6: "holding",
    16: "holding",
    4: "input",
}

# Point types a generated register map cycles through: every type and byte/word order appears.
MIXED_PROFILE: tuple[tuple[str, str, str, str, float], ...] = (
    # (type, table, word order, byte order, scale)
    ("float32", "holding", "big", "big", 1.0),
    ("int16", "holding", "big", "big", 0.1),
    ("uint16", "input", "big", "big", 1.0),
    ("int32", "holding", "little", "big", 1.0),
    ("uint32", "input", "big", "little", 1.0),
    ("float64", "holding", "little", "little", 1.0),
    ("bool", "coil", "big", "big", 1.0),
    ("float32", "input", "little", "big", 1.0),
    ("bool", "discrete", "big", "big", 1.0),
)


def _hash01(seed: int, step: int) -> float:
    """A cheap, deterministic pseudo-random number in [0, 1)."""
    x = (seed * 2654435761 + step * 40503 + 12345) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 2246822519) & 0xFFFFFFFF
    x ^= x >> 13
    return x / 4294967296.0


def value_at(point: Point, seed: int, step: int) -> Any:
    """The engineering value a simulated point holds during time step ``step``."""
    kind = point.type
    if kind == "bool":
        return (step + seed) % 3 != 0
    if kind in ("float32", "float64"):
        return 20.0 + 5.0 * math.sin(step / 10.0 + seed) + _hash01(seed, step) - 0.5
    if kind == "int16":
        raw = (step * 7 + seed * 31) % 2000 - 1000
    elif kind == "uint16":
        raw = (step + seed * 101) % 65536
    elif kind == "int32":
        raw = (step * 1001 + seed * 7919) % 400_000 - 200_000
    else:  # uint32
        raw = (step * 100_003 + seed * 65_537) % 2**32
    return raw * point.scale + point.offset


def held_value(point: Point, seed: int, step: int) -> Any:
    """What a correct gateway decodes from the registers during ``step`` (float32 rounding
    and integer scaling included)."""
    block = plan_reads([point])[0]
    registers = encode_value(point, value_at(point, seed, step))
    if block.bits:
        return bool(registers[0])
    return block.decode(registers)[0]


@dataclass(frozen=True)
class SimPoint:
    point: Point
    seed: int


@dataclass
class DeviceSpec:
    device_id: str
    port: int
    unit: int = 1
    points: list[SimPoint] = field(default_factory=list)
    fault: str | None = None
    holes: frozenset[tuple[str, int]] = frozenset()  # (table, address)
    max_registers: int | None = None
    busy_every: int | None = None
    serial: str | None = None  # default: derived from the device id (see persona_of)
    serial_address: int | None = None  # holding register of the serial; default: after the map
    fc43_exception: bool = False  # answer FC 43 with exception 01 (illegal function)
    tls: SimTls | None = None  # Modbus/TCP Security instead of plain Modbus TCP


@dataclass(frozen=True)
class SimTls:
    """A device's side of Modbus/TCP Security: its certificate and (clear, 0600) key, the CA
    its clients' certificates must come from, and the roles it serves; and, for the config
    written beside it, the gateway's client identity."""

    cert: Path
    key: Path
    client_ca: Path
    roles: frozenset[str]
    gateway_cert: Path
    gateway_key: Path


def make_points(
    count: int, *, types: Sequence[str] | None = None, period: float = 1.0, seed: int = 0
) -> list[SimPoint]:
    """A register map of ``count`` points: the mixed profile, or only ``types``."""
    out: list[SimPoint] = []
    next_addr = {"holding": 0, "input": 0, "coil": 0, "discrete": 0}
    for i in range(count):
        if types:
            kind = types[i % len(types)]
            table = "coil" if kind == "bool" else "holding"
            word, byte, scale = "big", "big", 1.0
        else:
            kind, table, word, byte, scale = MIXED_PROFILE[i % len(MIXED_PROFILE)]
        address = next_addr[table]
        next_addr[table] += 1 if table in ("coil", "discrete") else REGISTER_WIDTH[kind]
        point = Point.model_validate(
            {
                "name": f"{kind}_{i}",
                "address": address,
                "table": table,
                "type": kind,
                "word_order": word,
                "byte_order": byte,
                "scale": scale,
                "period": period,
            }
        )
        out.append(SimPoint(point, seed * 1000 + i))
    if max(next_addr.values()) > TABLE_SIZE:
        raise ValueError(f"{count} points do not fit a simulated device's {TABLE_SIZE} registers")
    return out


class SimulatedDevice:
    """One device's registers, refreshed from :func:`value_at` when the time step changes."""

    def __init__(self, spec: DeviceSpec, step: float) -> None:
        self.spec = spec
        self.step = step
        self._tables: dict[str, list[SimPoint]] = {}
        for sp in spec.points:
            self._tables.setdefault(sp.point.table, []).append(sp)
        self._last: dict[str, int] = {}
        self.requests = 0
        self.exceptions = 0  # answers with an exception code, of the quirks and faults
        self.persona = persona_of(spec)
        self._tables = self.persona.tables  # traded by a swap
        self.serial_address = (
            spec.serial_address if spec.serial_address is not None else _after_map(spec)
        )
        self.identifications = 0  # FC 43 requests answered
        self.server: DeviceServer | None = None
        # Writes taken (FC 5/6/15/16 answered without an exception), and the (table, address)
        # they wrote: a written register holds its value, as a setpoint does, instead of
        # following the simulated signal.
        self.writes = 0
        self.held: set[tuple[str, int]] = set()

    def table_size(self) -> int:
        """Registers (bits) per table: what the map uses plus a margin. pymodbus builds its
        tables in Python at start, so 2,048-entry tables cost 80 ms per device."""
        used = max(
            (sp.point.address + REGISTER_WIDTH[sp.point.type] for sp in self.spec.points), default=0
        )
        used = max(used, self.serial_address + SERIAL_REGISTERS)
        return min(TABLE_SIZE, max(64, used + 16))

    def current_step(self) -> int:
        return int(time.time() / self.step)

    def _follows(self, sp: SimPoint) -> bool:
        """Whether the point still follows the signal (nothing was written over it)."""
        if not self.held:
            return True
        p = sp.point
        width = 1 if p.table in ("coil", "discrete") else REGISTER_WIDTH[p.type]
        return not any((p.table, a) in self.held for a in range(p.address, p.address + width))

    def stats(self) -> dict[str, Any]:
        return {"requests": self.requests, "writes": self.writes, "exceptions": self.exceptions}

    def refresh(self, table: str, registers: list[int], step: int) -> None:
        if table in ("coil", "discrete"):
            for sp in self._tables.get(table, ()):
                if not self._follows(sp):
                    continue
                a = sp.point.address
                mask = 1 << (a % 16)
                if value_at(sp.point, sp.seed, step):
                    registers[a // 16] |= mask
                else:
                    registers[a // 16] &= ~mask
            return
        for sp in self._tables.get(table, ()):
            if not self._follows(sp):
                continue
            words = encode_value(sp.point, value_at(sp.point, sp.seed, step))
            registers[sp.point.address : sp.point.address + len(words)] = words
        if table == "holding":
            at = self.serial_address
            registers[at : at + SERIAL_REGISTERS] = serial_words(self.persona.serial)

    def identify(self, read_code: int, object_id: int) -> dict[int, bytes] | int:
        """FC 43 / MEI 14 (see :func:`_identify`)."""
        return _identify(self, read_code, object_id)

    async def action(
        self, function_code: int, address: int, count: int, registers: list[int], write: bool
    ) -> int | None:
        """Called on every request: refresh values, inject faults; returns an exception code."""
        code = await self._answer(function_code, address, count, registers, write)
        if code:
            self.exceptions += 1
        return code

    async def _answer(
        self, function_code: int, address: int, count: int, registers: list[int], write: bool
    ) -> int | None:
        self.requests += 1
        spec = self.spec
        fault = spec.fault or ""
        if fault == "dead":
            await asyncio.Event().wait()
        if fault.startswith("slow:"):
            await asyncio.sleep(float(fault.split(":", 1)[1]))
        if fault.startswith("exception:"):
            _, code, *first = fault.split(":")
            if not first or self.requests <= int(first[0]):
                return int(code)
        if spec.busy_every and self.requests % spec.busy_every == 0:
            return 0x06
        table = _FC_TABLE.get(function_code)
        # A hole is unmapped for writes too (a real device answers 02 either way).
        if spec.holes and any(t == table and address <= a < address + count for t, a in spec.holes):
            return 0x02
        if not write and spec.max_registers is not None and count > spec.max_registers:
            return 0x03
        if table is not None and write:
            self.writes += 1
            self.held.update((table, a) for a in range(address, address + count))
        if table is not None and not write:
            step = self.current_step()
            if self._last.get(table) != step:
                self._last[table] = step
                self.refresh(table, registers, step)
        return None


class SimulatedFleet:
    """Start every device's server on entry, stop them on exit."""

    def __init__(
        self, specs: list[DeviceSpec], *, host: str = "127.0.0.1", step: float = 1.0
    ) -> None:
        self.host = host
        self.devices = [SimulatedDevice(s, step) for s in specs]
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> SimulatedFleet:
        async with contextlib.AsyncExitStack() as stack:
            for device in self.devices:
                if device.spec.fault == "down":
                    continue
                tls = device.spec.tls
                server = (
                    DeviceServer(
                        self.host,
                        device.spec.port,
                        device.spec.unit,
                        device.table_size(),
                        device.action,
                        device.identify,
                    )
                    if tls is None
                    else TlsDeviceServer(
                        self.host,
                        device.spec.port,
                        device.spec.unit,
                        device.table_size(),
                        device.action,
                        sslctx=server_context(tls.cert, tls.key, None, tls.client_ca),
                        roles=tls.roles,
                        identify=device.identify,
                    )
                )
                device.server = server
                try:
                    await stack.enter_async_context(server)
                except RuntimeError as err:
                    # pymodbus logs the OSError of its listen and raises this instead.
                    raise OSError(
                        f"{device.spec.device_id}: {self.host}:{device.spec.port} is in use, "
                        "or not an address of this machine"
                    ) from err
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    def swap(self, first: str, second: str) -> None:
        """Two devices trade places (see :func:`_swap`)."""
        _swap(self, first, second)

    def stats(self) -> dict[str, Any]:
        """Counters per device: requests, writes taken, exceptions answered."""
        return {"devices": {d.spec.device_id: d.stats() for d in self.devices}}


def gateway_config(
    specs: list[DeviceSpec],
    *,
    host: str,
    pki_dir: Path,
    hub_port: int,
    hub_host: str = "127.0.0.1",
    state_dir: Path | None = None,
    max_age: float = 1.0,
    max_bytes: int = 4000,
    identity: str = "none",
    link: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A gateway config that polls exactly these simulated devices, verified by ``identity``
    (one of :data:`IDENTITY_METHODS`): each on its own TCP port, or, with ``link`` (a
    ``[[links]]`` entry: name, type and where), all as units on it."""
    doc = skeleton(
        pki_dir=pki_dir,
        hub_port=hub_port,
        hub_host=hub_host,
        state_dir=state_dir,
        max_age=max_age,
        max_bytes=max_bytes,
    )
    for spec in specs:
        doc["devices"].append(
            {
                "id": spec.device_id,
                **device_files(pki_dir, spec.device_id),
                "modbus": (
                    {
                        "host": host,
                        "port": spec.port,
                        "unit": spec.unit,
                        **(
                            {}
                            if spec.tls is None
                            else {
                                "tls": {
                                    "ca": str(spec.tls.client_ca),
                                    "cert": str(spec.tls.gateway_cert),
                                    "key": str(spec.tls.gateway_key),
                                }
                            }
                        ),
                    }
                    if link is None
                    else {"link": link["name"], "unit": spec.unit}
                ),
                "identity": identity_config(spec, identity),
                "points": [
                    {
                        k: v
                        for k, v in sp.point.model_dump().items()
                        if (v is not None and v != Point.model_fields[k].default)
                        or k in ("name", "address")
                    }
                    for sp in spec.points
                ],
            }
        )
    if link is not None:
        doc["links"] = [link]
    return doc


# -- identity --

SERIAL_REGISTERS = 5  # holding registers the serial occupies (10 ASCII characters)
IDENTITY_METHODS = ("none", "fc43", "registers", "both")


@dataclass
class Persona:
    """Who a simulated device is: its FC 43 objects and serial, and the values it serves
    (``tables``: its points by table; traded whole by a swap)."""

    device_id: str
    serial: str
    objects: dict[int, bytes]
    tables: dict[str, list[SimPoint]] = field(default_factory=dict)
    fc43: bool = True  # False: answers FC 43 with exception 01


def default_serial(device_id: str) -> str:
    return f"SN{zlib.crc32(device_id.encode()):08X}"


def persona_of(spec: DeviceSpec) -> Persona:
    serial = spec.serial or default_serial(spec.device_id)
    objects = {
        0x00: b"Fieldgate Simulations",
        0x01: b"FGS-100",
        0x02: b"2.4.1",
        0x03: b"https://fieldgate.invalid/fgs-100",
        0x04: b"Simulated PLC",
        0x05: f"FGS-100 SN {serial}".encode(),
        0x06: f"unit {spec.unit}".encode(),
    }
    tables: dict[str, list[SimPoint]] = {}
    for sp in spec.points:
        tables.setdefault(sp.point.table, []).append(sp)
    return Persona(spec.device_id, serial, objects, tables, fc43=not spec.fc43_exception)


def serial_words(serial: str) -> list[int]:
    raw = serial.encode("ascii")[: 2 * SERIAL_REGISTERS].ljust(2 * SERIAL_REGISTERS, b"\0")
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]


def _after_map(spec: DeviceSpec) -> int:
    used = max(
        (
            sp.point.address + REGISTER_WIDTH[sp.point.type]
            for sp in spec.points
            if sp.point.table == "holding"
        ),
        default=0,
    )
    return used + 8


def identity_config(spec: DeviceSpec, method: str) -> str | dict[str, Any]:
    """A device's ``identity`` in a gateway config, for ``method`` (:data:`IDENTITY_METHODS`)."""
    if method == "none":
        return "none"
    serial = {
        "name": "serial",
        "address": spec.serial_address if spec.serial_address is not None else _after_map(spec),
        "count": SERIAL_REGISTERS,
    }
    if method == "fc43":
        return {"fc43": True}
    if method == "registers":
        return {"registers": [serial]}
    if method == "both":
        return {"fc43": True, "registers": [serial]}
    raise ValueError(f"identity method must be one of {', '.join(IDENTITY_METHODS)}: {method!r}")


def _identify(self: SimulatedDevice, read_code: int, object_id: int) -> dict[int, bytes] | int:
    """FC 43: this device's objects (the server picks those the read code asks for), or
    exception 01 for a device that has no FC 43."""
    _ = read_code, object_id
    self.requests += 1
    if self.spec.fault == "dead":
        return 0x0B  # never reached by a client: a dead device's reads time out first
    if not self.persona.fc43:
        self.exceptions += 1
        return 0x01
    self.identifications += 1
    return dict(self.persona.objects)


def _swap_personas(a: SimulatedDevice, b: SimulatedDevice) -> None:
    """Trade identity and values, and drop both devices' connections, in one step of the loop
    (nothing awaits in between): no request is answered on an old connection with the other's
    values."""
    if a.table_size() != b.table_size() or a.serial_address != b.serial_address:
        raise ValueError(
            f"{a.spec.device_id} and {b.spec.device_id} have different register layouts"
        )
    for device in (a, b):
        if device.server is not None:
            device.server.drop_connections()
    a.persona, b.persona = b.persona, a.persona
    a._tables, b._tables = a.persona.tables, b.persona.tables
    a._last.clear()
    b._last.clear()


def _swap(self: SimulatedFleet, first: str, second: str) -> None:
    """Two devices trade places: each now answers, on the other's port, with the other's
    identity and values; their current connections drop."""
    by_id = {d.spec.device_id: d for d in self.devices}
    missing = [name for name in (first, second) if name not in by_id]
    if missing:
        raise KeyError(f"no simulated device {missing[0]!r}")
    _swap_personas(by_id[first], by_id[second])
