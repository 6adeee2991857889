"""The only shapes a gateway config can take.

A config is TOML validated by pydantic with ``extra="forbid"``. Paths are relative to the config
file's folder. A bad file raises :class:`ConfigError` naming the file, each bad field's path
(``devices[3].points[2].type``) and the reason; nothing starts from a config that was refused.
"""

from __future__ import annotations

import os
import ssl
import stat
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from adapters.ble.gatt import ADDRESS_PATTERN, UUID_PATTERN, struct_fields
from gateway.core.errors import ConfigError

Table = Literal["holding", "input", "coil", "discrete"]
PointType = Literal["int16", "uint16", "int32", "uint32", "float32", "float64", "bool"]
Order = Literal["big", "little"]

# Registers (16-bit words) each type occupies; a bool occupies one register or one bit.
REGISTER_WIDTH: dict[str, int] = {
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "float32": 2,
    "float64": 4,
    "bool": 1,
}

# IoT Hub allows a few more characters in device ids; these are the ones that are also safe in an
# MQTT topic level, a certificate CN and a file name.
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"


class _Model(BaseModel):
    # No float here means anything as nan or inf: a scale of nan would turn every reading into nan.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _resolve(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base")
    path = value.expanduser()
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    return path


def _existing_file(value: Path, info: ValidationInfo) -> Path:
    path = _resolve(value, info)
    if not (info.context or {}).get("check_files", True):
        return path
    if not path.is_file():
        raise ValueError(f"file not found: {path}")
    return path


FilePath = Annotated[Path, Field()]

# IoT Hub waits 1.5 x the client's keep-alive for a packet, and at most 1,767 s: a client that
# asks for more than 1,177 s is cut off between its pings.
MAX_KEEPALIVE = 1177


def _checks_files(info: ValidationInfo) -> bool:
    return bool((info.context or {}).get("check_files", True))


def _trust_bundle(value: Path, info: ValidationInfo) -> Path:
    path = _existing_file(value, info)
    if not _checks_files(info):
        return path
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(path))
    except (ssl.SSLError, ValueError) as err:
        why = getattr(err, "reason", None) or err
        raise ValueError(f"{path} holds no PEM certificates that TLS can load ({why})") from None
    return path


def _private_file(value: Path, info: ValidationInfo) -> Path:
    path = _existing_file(value, info)
    if not _checks_files(info):
        return path
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ValueError(
            f"{path} is mode {mode:04o}: group or others may read it; chmod 600 {path}"
        )
    return path


def _state_dir(value: Path, info: ValidationInfo) -> Path:
    path = _resolve(value, info)
    if not _checks_files(info):
        return path
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a folder")
    # The nearest folder that exists must let the gateway make the rest.
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"cannot make {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot make {path}: {parent} is not writable")
    return path


class HubConfig(_Model):
    hostname: str = Field(
        min_length=1, description="IoT Hub host name, used in the username and TLS"
    )
    address: str | None = Field(
        default=None, description="connect here instead of hostname (an edgeHub or a stand-in)"
    )
    port: int = Field(default=8883, ge=1, le=65535)
    ca_file: FilePath
    max_inflight: int = Field(default=16, ge=1, le=1000)
    keepalive: int = Field(default=60, ge=5, description=f"seconds, at most {MAX_KEEPALIVE}")
    connect_rate: float = Field(default=100.0, gt=0, description="new connections per second")
    send_rate: float = Field(
        default=0.0,
        ge=0,
        description="messages per second across all devices, backlog included (0: unlimited)",
    )
    backoff_min: float = Field(default=0.5, gt=0)
    backoff_max: float = Field(default=30.0, gt=0)
    connect_timeout: float = Field(default=10.0, gt=0)

    _ca = field_validator("ca_file")(_trust_bundle)

    @field_validator("keepalive")
    @classmethod
    def _keepalive(cls, value: int) -> int:
        if value > MAX_KEEPALIVE:
            raise ValueError(
                f"{value} s is more than {MAX_KEEPALIVE} s: IoT Hub waits 1.5 x the keep-alive "
                "and at most 1,767 s, so it would cut the connection off between pings"
            )
        return value


class BatchingConfig(_Model):
    max_bytes: int = Field(default=4000, ge=512, le=262_144)
    max_age: float = Field(
        default=1.0, gt=0, le=3600, description="seconds from a read to the hub, at most"
    )
    lead: float = Field(
        default=0.05,
        ge=0,
        le=60,
        description="a batch closes this long before max_age: time to seal, store and publish",
    )

    @property
    def close_after(self) -> float:
        """How long a batch stays open: max_age less the lead (at most half of max_age)."""
        return self.max_age - min(self.lead, self.max_age / 2)


class SealingConfig(_Model):
    keyring: FilePath
    key_id: str = Field(min_length=1, max_length=64)

    _keyring = field_validator("keyring")(_existing_file)


class SecretsConfig(_Model):
    passphrase_env: str = "FIELDGATE_KEY_PASSPHRASE"
    passphrase_file: FilePath | None = None
    allow_clear_keys: bool = Field(
        default=False, description="accept device keys that are not encrypted (with a warning)"
    )

    @field_validator("passphrase_file")
    @classmethod
    def _file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else _private_file(value, info)

    def passphrase(self) -> bytes:
        """The passphrase that unlocks private keys and the sealing keyring."""
        if self.passphrase_file is not None:
            return self.passphrase_file.read_bytes().strip()
        value = os.environ.get(self.passphrase_env)
        if not value:
            raise ConfigError(
                "secrets",
                [
                    f"secrets.passphrase_env: environment variable {self.passphrase_env} "
                    "is not set and no secrets.passphrase_file is given"
                ],
            )
        return value.encode()


class StoreConfig(_Model):
    kind: Literal["sqlite", "memory"] = Field(
        default="sqlite",
        description="memory keeps nothing across a crash; it exists to measure the store's cost",
    )
    path: FilePath | None = Field(default=None, description="default: {state_dir}/store.db")
    max_bytes: int = Field(default=1024**3, ge=64 * 1024)
    policy: Literal["drop-oldest", "refuse-newest"] = "drop-oldest"

    @field_validator("path")
    @classmethod
    def _path(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else _resolve(value, info)


class GatewaySection(_Model):
    state_dir: FilePath = Path("state")
    shutdown_grace: float = Field(default=5.0, ge=0, le=300)

    _state = field_validator("state_dir")(_state_dir)


class Point(_Model):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:/-]+$")
    address: int = Field(ge=0, le=65535)
    table: Table = "holding"
    type: PointType = "uint16"
    word_order: Order = "big"
    byte_order: Order = "big"
    scale: float = 1.0
    offset: float = 0.0
    period: float = Field(default=1.0, ge=0.01, le=86_400, description="seconds between polls")
    unit: str | None = Field(default=None, max_length=16)

    @model_validator(mode="after")
    def _fits(self) -> Point:
        if self.table in ("coil", "discrete") and self.type != "bool":
            raise ValueError(
                f"table {self.table!r} holds bits; type must be 'bool', not {self.type!r}"
            )
        if self.address + REGISTER_WIDTH[self.type] > 65536:
            raise ValueError(f"{self.type} at address {self.address} runs past register 65535")
        return self


def _span(point: Point) -> str:
    if point.table in ("coil", "discrete"):
        return f"{point.table} {point.address}"
    last = point.address + REGISTER_WIDTH[point.type] - 1
    where = f"{point.address}" if last == point.address else f"{point.address}-{last}"
    return f"{point.table} {where}"


def overlapping_points(points: list[Point]) -> str | None:
    """Two points of one device that read the same register or bit, named, or None."""

    def end(point: Point) -> int:
        bits = point.table in ("coil", "discrete")
        return point.address + (1 if bits else REGISTER_WIDTH[point.type])

    order = sorted(range(len(points)), key=lambda i: (points[i].table, points[i].address))
    widest: int | None = None  # the point reaching furthest so far, in the current table
    for i in order:
        point = points[i]
        if widest is not None and points[widest].table != point.table:
            widest = None
        if widest is not None and point.address < end(points[widest]):
            first, second = sorted((widest, i))
            a, b = points[first], points[second]
            return (
                f"points[{second}] {b.name!r} ({_span(b)}) overlaps points[{first}] {a.name!r} "
                f"({_span(a)})"
            )
        if widest is None or end(point) > end(points[widest]):
            widest = i
    return None


class ModbusEndpoint(_Model):
    host: str = Field(min_length=1)
    port: int = Field(default=502, ge=1, le=65535)
    unit: int = Field(default=1, ge=0, le=247)
    timeout: float = Field(default=1.0, gt=0, le=60)
    max_gap: int = Field(
        default=8, ge=0, le=124, description="registers a read may skip to coalesce"
    )

    @property
    def label(self) -> str:
        """How the endpoint is named in evidence, logs and the registry."""
        return f"{self.host}:{self.port}/unit {self.unit}"


class BleValue(_Model):
    """One field of a characteristic's struct: its point name, scale and offset."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:/-]+$")
    scale: float = 1.0
    offset: float = 0.0
    unit: str | None = Field(default=None, max_length=16)


class BleCharacteristic(_Model):
    """A row of a BLE device's decode table."""

    uuid: str = Field(pattern=UUID_PATTERN)
    mode: Literal["notify", "poll"] = "notify"
    period: float = Field(default=10.0, ge=0.05, le=86_400, description="poll mode: seconds")
    format: str = Field(min_length=1, max_length=64, description="struct format, e.g. '<IhHB'")
    values: list[BleValue] = Field(min_length=1)

    @field_validator("uuid")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()

    @model_validator(mode="after")
    def _fields_match(self) -> BleCharacteristic:
        count = struct_fields(self.format)
        if count != len(self.values):
            raise ValueError(
                f"format {self.format!r} holds {count} values, but {len(self.values)} are named"
            )
        return self


class BleChallenge(_Model):
    """HMAC-SHA256(key, nonce || identity address) over a characteristic, on every connect."""

    characteristic: str = Field(pattern=UUID_PATTERN)
    key_file: FilePath = Field(description="the device's key: 64+ hex digits or 32+ raw bytes")
    max_failures: int = Field(
        default=3, ge=1, le=100, description="failures per hour before the device is held off"
    )

    _key = field_validator("key_file")(_existing_file)

    @field_validator("characteristic")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()


class BleEndpoint(_Model):
    address: str | None = Field(
        default=None, pattern=ADDRESS_PATTERN, description="the identity address"
    )
    app_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="for devices with private addresses: the id they advertise",
    )
    adapter: str = Field(default="hci0", pattern=r"^hci[0-9]{1,3}$")
    bond: Literal["none", "just-works", "authenticated"]
    passkey: int | None = Field(
        default=None, ge=0, le=999_999, description="authenticated bonds: the device's passkey"
    )
    challenge: BleChallenge | None = None
    characteristics: list[BleCharacteristic] = Field(min_length=1)

    @field_validator("address")
    @classmethod
    def _upper(cls, value: str | None) -> str | None:
        return None if value is None else value.upper()

    @model_validator(mode="after")
    def _consistent(self) -> BleEndpoint:
        if (self.address is None) == (self.app_id is None):
            raise ValueError("give exactly one of address (identity address) and app_id")
        if self.app_id is not None and self.challenge is None:
            raise ValueError(
                "a device matched by app_id must have a challenge: anyone can advertise an id"
            )
        if self.app_id is not None and self.bond == "none":
            raise ValueError(
                "a device matched by app_id needs a bond: only a bond reveals its identity address"
            )
        if self.bond == "authenticated" and self.passkey is None:
            raise ValueError("bond 'authenticated' needs the device's passkey")
        if self.bond != "authenticated" and self.passkey is not None:
            raise ValueError(f"passkey is only used by bond 'authenticated', not {self.bond!r}")
        seen: set[str] = set()
        uuids: set[str] = set()
        for row in self.characteristics:
            if row.uuid in uuids:
                raise ValueError(f"characteristic {row.uuid} is listed twice")
            uuids.add(row.uuid)
            for value in row.values:
                if value.name in seen:
                    raise ValueError(f"value name {value.name!r} is used twice")
                seen.add(value.name)
        if self.challenge is not None and self.challenge.characteristic in uuids:
            raise ValueError("the challenge characteristic cannot also be a data characteristic")
        return self

    @property
    def label(self) -> str:
        """How the device is named in evidence, logs and the registry."""
        if self.address is not None:
            return f"{self.adapter}/{self.address}"
        return f"{self.adapter}/app-id {self.app_id}"

    @property
    def polls(self) -> bool:
        """Only polled characteristics: the device can give its slot back between polls."""
        return all(row.mode == "poll" for row in self.characteristics)


class BleSection(_Model):
    """Settings of every BLE adapter this gateway drives."""

    dbus_address: str | None = Field(
        default=None, description="D-Bus of bluetoothd (default: the system bus)"
    )
    max_connections: int = Field(
        default=7, ge=1, le=10_000, description="connection slots per adapter"
    )
    max_gatt_ops: int = Field(
        default=2, ge=1, le=64, description="concurrent GATT operations per link"
    )
    connect_timeout: float = Field(default=20.0, gt=0, le=300)
    backoff_min: float = Field(default=1.0, gt=0)
    backoff_max: float = Field(default=60.0, gt=0)
    hold_off: float = Field(
        default=300.0, gt=0, description="seconds a refused device waits before it is tried again"
    )
    company_id: int = Field(
        default=0xFFFF, ge=0, le=0xFFFF, description="manufacturer data that carries app ids"
    )
    scan_every: float = Field(
        default=300.0,
        gt=0,
        description="seconds between discovery windows that look for devices not allow-listed",
    )
    scan_window: float = Field(default=10.0, gt=0, le=600, description="seconds per window")


class DeviceConfig(_Model):
    id: str = Field(pattern=DEVICE_ID_PATTERN)
    enabled: bool = True
    auth: Literal["x509-ca", "x509-thumbprint"] = Field(
        default="x509-ca",
        description="how IoT Hub knows the device: its CA (leaf CN = id) or its leaf's thumbprint",
    )
    cert: FilePath = Field(description="PEM: the device leaf, then the intermediate")
    key: FilePath = Field(description="PEM: encrypted PKCS#8 private key")
    modbus: ModbusEndpoint | None = None
    points: list[Point] = Field(default_factory=list)
    ble: BleEndpoint | None = None

    _files = field_validator("cert", "key")(_existing_file)

    @model_validator(mode="after")
    def _one_transport(self) -> DeviceConfig:
        if (self.modbus is None) == (self.ble is None):
            raise ValueError("give exactly one of modbus and ble")
        if self.modbus is not None and not self.points:
            raise ValueError("points: a Modbus device needs at least one point")
        if self.ble is not None and self.points:
            raise ValueError("points: a BLE device names its values in ble.characteristics")
        seen: set[str] = set()
        for point in self.points:
            if point.name in seen:
                raise ValueError(f"point name {point.name!r} is used twice")
            seen.add(point.name)
        overlap = overlapping_points(self.points)
        if overlap is not None:
            raise ValueError(overlap)
        return self

    @property
    def transport(self) -> str:
        return "modbus-tcp" if self.modbus is not None else "ble"

    @property
    def endpoint(self) -> str:
        if self.modbus is not None:
            return self.modbus.label
        assert self.ble is not None
        return self.ble.label


class Config(_Model):
    hub: HubConfig
    sealing: SealingConfig
    batching: BatchingConfig = BatchingConfig()
    secrets: SecretsConfig = SecretsConfig()
    gateway: GatewaySection = GatewaySection()
    store: StoreConfig = StoreConfig()
    ble: BleSection = BleSection()
    devices: list[DeviceConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_devices(self) -> Config:
        seen: dict[str, int] = {}
        endpoints: dict[tuple[str, int, int], str] = {}
        radios: dict[str, str] = {}
        for index, device in enumerate(self.devices):
            if device.id in seen:
                raise ValueError(
                    f"devices[{index}].id: {device.id!r} is already devices[{seen[device.id]}]"
                )
            seen[device.id] = index
            if device.modbus is not None:
                key = (device.modbus.host, device.modbus.port, device.modbus.unit)
                if key in endpoints:
                    raise ValueError(
                        f"devices[{index}].modbus: {key[0]}:{key[1]} unit {key[2]} is already "
                        f"bound to device {endpoints[key]!r}"
                    )
                endpoints[key] = device.id
            elif device.ble is not None:
                name = device.ble.address or f"app-id {device.ble.app_id}"
                if name in radios:
                    raise ValueError(
                        f"devices[{index}].ble: {name} is already device {radios[name]!r}"
                    )
                radios[name] = device.id
        return self


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or part.startswith("function-"):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _reason(error: Any) -> str:
    kind = error["type"]
    given = error.get("input")
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"{given!r} is not one of {expected}"
    if kind == "extra_forbidden":
        return "unknown field (check its spelling)"
    if kind == "missing":
        return "field required"
    message = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    if kind.endswith(("_type", "_parsing")) or kind in ("greater_than", "less_than_equal"):
        return f"{message} (got {given!r})"
    return message


def validate(
    data: dict[str, Any], path: str, *, base: Path | None = None, check_files: bool = True
) -> Config:
    try:
        config = Config.model_validate(data, context={"base": base, "check_files": check_files})
    except ValidationError as err:
        problems = []
        for error in err.errors():
            where = _loc(error["loc"])
            reason = _reason(error)
            problems.append(f"{where}: {reason}" if where else reason)
        raise ConfigError(path, problems) from err
    if check_files:
        from gateway.preflight import problems as preflight

        found = preflight(config)
        if found:
            raise ConfigError(path, found)
    return config


def load(path: str | Path, *, check_files: bool = True) -> Config:
    """Read and validate a config file, or raise :class:`ConfigError` naming what is wrong."""
    file = Path(path)
    try:
        raw = file.read_bytes()
    except OSError as err:
        raise ConfigError(str(file), [f"cannot read: {err.strerror}"]) from err
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(str(file), [f"not valid TOML: {err}"]) from err
    return validate(data, str(file), base=file.resolve().parent, check_files=check_files)


def render_toml(doc: dict[str, Any]) -> str:
    """Write the subset of TOML a gateway config uses: scalars, tables, arrays of tables."""
    out: list[str] = []
    _emit_table(doc, [], out)
    return "\n".join(out).strip() + "\n"


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _emit_table(doc: dict[str, Any], path: list[str], out: list[str]) -> None:
    scalars = {k: v for k, v in doc.items() if not isinstance(v, dict | list) and v is not None}
    for key, value in scalars.items():
        out.append(f"{key} = {_scalar(value)}")
    for key, value in doc.items():
        if isinstance(value, dict):
            out.append("")
            out.append(f"[{'.'.join([*path, key])}]")
            _emit_table(value, [*path, key], out)
        elif isinstance(value, list):
            for item in value:
                out.append("")
                out.append(f"[[{'.'.join([*path, key])}]]")
                _emit_table(item, [*path, key], out)
