"""The only shapes a gateway config can take: the gateway's own sections, and a device entry
that composes each adapter's models (:mod:`adapters.modbus.config`, :mod:`adapters.ble.config`).

Paths are relative to the config file's folder (validation context ``base``); files are checked
unless the context says ``check_files=False``. Loading and error naming: :mod:`.loading`.
"""

from __future__ import annotations

import os
import ssl
import stat
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from adapters.ble.config import BleEndpoint, BleSection
from adapters.modbus.config import (
    UNIT_RANGES,
    ModbusEndpoint,
    ModbusIdentity,
    ModbusLinkConfig,
    Point,
    implicit_link,
    point_problems,
    too_wide,
)
from gateway.core import iothub
from gateway.core.errors import ConfigError
from gateway.core.policy import DevicePolicy, Switches, WriteRule

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
    try:
        found = path.is_file()
    except OSError as err:  # a folder on the way that this user may not enter
        raise ValueError(f"{path} cannot be reached by uid {os.getuid()}: {err.strerror}") from None
    if not found:
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
    except OSError as err:
        # An installed gateway runs as its own user: a bundle left 0600 root is named, not a
        # traceback (docs/install.md: the PKI folder is group fieldgate).
        raise ValueError(f"{path} cannot be read by uid {os.getuid()}: {err.strerror}") from None
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
    server_name: str | None = Field(
        default=None,
        min_length=1,
        description="the name the hub's TLS certificate must carry when it is not hostname "
        "(edgeHub: the edge device's host name, while the username keeps the IoT Hub's)",
    )
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
    """Where the passphrase comes from: a systemd credential, a private file, or the environment.

    The credential is read only when asked for (at start), not at validation: the credentials
    folder exists only inside the unit's process, and `fieldgate store verify` or a config
    check outside it must still load the config.
    """

    passphrase_env: str = "FIELDGATE_KEY_PASSPHRASE"
    passphrase_file: FilePath | None = None
    passphrase_credential: str | None = Field(
        default=None,
        description="a systemd credential name (LoadCredential=NAME:...), read from "
        "$CREDENTIALS_DIRECTORY/NAME",
    )
    allow_clear_keys: bool = Field(
        default=False, description="accept device keys that are not encrypted (with a warning)"
    )

    @field_validator("passphrase_file")
    @classmethod
    def _file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else _private_file(value, info)

    @field_validator("passphrase_credential")
    @classmethod
    def _credential_name(cls, value: str | None) -> str | None:
        # systemd's own rule for a credential name: one file name, as LoadCredential= takes it.
        if value is not None and (
            value in ("", ".", "..") or "/" in value or "\0" in value or len(value) > 255
        ):
            raise ValueError(
                f"{value!r} is not a credential name "
                "(one file name, as in LoadCredential=NAME:PATH)"
            )
        return value

    @model_validator(mode="after")
    def _one_source(self) -> SecretsConfig:
        if self.passphrase_file is not None and self.passphrase_credential is not None:
            raise ValueError(
                "give secrets.passphrase_file or secrets.passphrase_credential, not both"
            )
        return self

    def passphrase(self) -> bytes:
        """The passphrase that unlocks private keys and the sealing keyring."""
        if self.passphrase_credential is not None:
            return _credential(self.passphrase_credential)
        if self.passphrase_file is not None:
            return self.passphrase_file.read_bytes().strip()
        value = os.environ.get(self.passphrase_env)
        if not value:
            raise ConfigError(
                "secrets",
                [
                    f"secrets.passphrase_env: environment variable {self.passphrase_env} "
                    "is not set and no secrets.passphrase_file or "
                    "secrets.passphrase_credential is given"
                ],
            )
        return value.encode()


def _credential(name: str) -> bytes:
    """A systemd credential's contents: systemd puts each LoadCredential= (or SetCredential=)
    in a private, read-only folder named by $CREDENTIALS_DIRECTORY, one file per name."""
    field = "secrets.passphrase_credential"
    folder = os.environ.get("CREDENTIALS_DIRECTORY")
    if not folder:
        raise ConfigError(
            "secrets",
            [
                f"{field}: credential {name!r} asked for, but CREDENTIALS_DIRECTORY is not set "
                f"(run under systemd with LoadCredential={name}:/etc/fieldgate/credentials/"
                f"{name}, or use secrets.passphrase_env or secrets.passphrase_file)"
            ],
        )
    path = Path(folder) / name
    try:
        value = path.read_bytes().strip()
    except FileNotFoundError:
        raise ConfigError(
            "secrets",
            [
                f"{field}: credential {name!r} not found: no {path} (is LoadCredential={name}:... "
                "in the unit?)"
            ],
        ) from None
    except OSError as err:
        raise ConfigError(
            "secrets", [f"{field}: credential {name!r} cannot be read: {path}: {err.strerror}"]
        ) from err
    if not value:
        raise ConfigError("secrets", [f"{field}: credential {name!r} is empty: {path}"])
    return value


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
    id: str = Field(
        default="fieldgate",
        pattern=DEVICE_ID_PATTERN,
        description="the gateway's own IoT Hub device id: its audit chain's id",
    )
    # The gateway's own identity (``fieldgate pki init`` makes one): it signs the audit log's
    # heads and sends the audit stream. Without it the log is chained but neither signed nor
    # sent.
    cert: FilePath | None = Field(
        default=None, description="PEM: the gateway's leaf (CN = gateway.id), then the intermediate"
    )
    key: FilePath | None = Field(default=None, description="PEM: its encrypted PKCS#8 key")
    state_dir: FilePath = Path("state")
    shutdown_grace: float = Field(default=5.0, ge=0, le=300)

    _state = field_validator("state_dir")(_state_dir)

    @field_validator("cert", "key")
    @classmethod
    def _identity_files(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else _existing_file(value, info)

    @model_validator(mode="after")
    def _both(self) -> GatewaySection:
        if (self.cert is None) != (self.key is None):
            missing = "key" if self.key is None else "cert"
            raise ValueError(f"{missing}: the gateway's identity needs both cert and key")
        return self


class TamperFile(_Model):
    """A file or GPIO value on the box (``/sys/class/gpio/gpioN/value``): any other content
    than ``normal`` is a tamper signal."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]*$")
    path: Path
    normal: str = Field(description="the content (stripped) when the enclosure is closed")

    @field_validator("path")
    @classmethod
    def _path(cls, value: Path, info: ValidationInfo) -> Path:
        return _resolve(value, info)


class TamperInput(_Model):
    """A device's point that is a tamper input (an enclosure switch on a coil or discrete
    input): a reading other than ``normal`` is a tamper signal."""

    point: str = Field(min_length=1, max_length=64)
    normal: bool = False


class AuditSection(_Model):
    stream: bool = Field(
        default=True, description="send the audit log to the hub under the gateway's identity"
    )
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=64 * 1024, description="its own quota")
    head_every: int = Field(default=100, ge=1, le=100_000, description="records per signed head")
    head_interval: float = Field(
        default=10.0, gt=0, le=3600, description="seconds before records get a head, at most"
    )
    clock_jump: float = Field(
        default=5.0, gt=0, description="seconds the wall clock may move apart from the monotonic"
    )
    tamper_files: list[TamperFile] = Field(default_factory=list)
    tamper_interval: float = Field(default=1.0, ge=0.05, le=3600, description="seconds")

    @model_validator(mode="after")
    def _names(self) -> AuditSection:
        seen: set[str] = set()
        for index, item in enumerate(self.tamper_files):
            if item.name in seen:
                raise ValueError(f"tamper_files[{index}].name: {item.name!r} is used twice")
            seen.add(item.name)
        return self


class WriteLimit(_Model):
    """One point the cloud may write; ``min``/``max`` bound a number (inclusive)."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> WriteLimit:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


class DeviceControl(_Model):
    """What the cloud may make this device do (docs/commands.md). Absent: no writes at all;
    reads and status are always answered unless [control] is disabled."""

    channels: list[Literal["method", "c2d", "twin"]] = Field(
        default_factory=list, description="which channels may write (method, c2d, twin)"
    )
    max_writes_per_minute: int = Field(default=6, ge=0, le=6000)
    max_reads_per_minute: int = Field(
        default=60, ge=0, le=6000, description="fresh reads by the read method, any 60 s"
    )
    writes: dict[str, WriteLimit] = Field(
        default_factory=dict, description="the points the cloud may write, with their range"
    )

    def policy(self) -> DevicePolicy:
        return DevicePolicy(
            writes={n: WriteRule(w.min, w.max) for n, w in self.writes.items()},
            channels=frozenset(self.channels),
            per_minute=self.max_writes_per_minute,
            reads_per_minute=self.max_reads_per_minute,
        )


class ControlSection(_Model):
    """Gateway-wide switches of the cloud-to-device path."""

    enabled: bool = Field(default=True, description="false: every cloud command is refused")
    read_only: bool = Field(default=False, description="true: every write is refused")
    timeout: float = Field(
        default=10.0, gt=0, le=120, description="seconds a device has to carry out a command"
    )
    report_interval: float = Field(
        default=5.0,
        ge=0.1,
        description="at most one reported-properties patch per device this often",
    )
    twin_rate: float = Field(
        default=10.0,
        gt=0,
        le=iothub.TWIN_UPDATES_PER_S,
        description="twin reads and reported patches per second, all devices together",
    )

    def switches(self) -> Switches:
        return Switches(enabled=self.enabled, read_only=self.read_only)


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
    control: DeviceControl = DeviceControl()
    tamper: list[TamperInput] = Field(
        default_factory=list, description="points that are tamper inputs (enclosure switches)"
    )
    # After modbus and ble: its check sees which transport the device has.
    identity: ModbusIdentity | None = Field(
        default=None,
        validate_default=True,
        description='Modbus: how the device is verified (fc43, registers), or "none"',
    )

    _files = field_validator("cert", "key")(_existing_file)

    @field_validator("identity")
    @classmethod
    def _identity(cls, value: ModbusIdentity | None, info: ValidationInfo) -> ModbusIdentity | None:
        # A device whose modbus or ble table failed is named there; nothing to add here.
        if value is None and info.data.get("modbus") is not None:
            raise ValueError(
                'a Modbus device must say how it is verified: write identity = "none" (it '
                "cannot be; shown as unverified), or a [devices.identity] table with fc43 = true "
                'and/or registers = [{ name = "serial", address = 100, count = 4 }], then run '
                "fieldgate enroll --config FILE"
            )
        if value is not None and info.data.get("ble") is not None:
            raise ValueError("a BLE device is verified by its ble table (bond, challenge)")
        return value

    @model_validator(mode="after")
    def _one_transport(self) -> DeviceConfig:
        if (self.modbus is None) == (self.ble is None):
            raise ValueError("give exactly one of modbus and ble")
        if self.modbus is not None and not self.points:
            raise ValueError("points: a Modbus device needs at least one point")
        if self.ble is not None and self.points:
            raise ValueError("points: a BLE device names its values in ble.characteristics")
        problem = point_problems(self.points)
        if problem is None and self.modbus is not None and self.modbus.link is None:
            problem = too_wide(self.points, self.modbus.max_registers)
        if problem is not None:
            raise ValueError(problem)
        self._check_writes()
        self._check_tamper()
        return self

    def _check_tamper(self) -> None:
        by_name = {p.name: p for p in self.points}
        for index, item in enumerate(self.tamper):
            point = by_name.get(item.point)
            if point is None:
                raise ValueError(
                    f"tamper[{index}].point: the device has no Modbus point {item.point!r}"
                )
            if point.type != "bool":
                raise ValueError(
                    f"tamper[{index}].point: {item.point!r} is {point.type}; a tamper input is "
                    "a coil or discrete input (type bool)"
                )

    def point_names(self) -> list[str]:
        """The names of this device's values: its Modbus points or its BLE values."""
        if self.ble is not None:
            return [v.name for row in self.ble.characteristics for v in row.values]
        return [p.name for p in self.points]

    def _check_writes(self) -> None:
        names = self.point_names()
        by_name = {p.name: p for p in self.points}
        for name, limit in self.control.writes.items():
            if name not in names:
                raise ValueError(
                    f"control.writes.{name}: the device has no point {name!r} "
                    f"(points: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''})"
                )
            if self.ble is not None:
                row = next(
                    r for r in self.ble.characteristics if name in [v.name for v in r.values]
                )
                if not row.writable:
                    raise ValueError(
                        f"control.writes.{name}: its characteristic {row.uuid} is not writable "
                        "(give the row writable = true)"
                    )
            point = by_name.get(name)
            if point is not None and not point.writable:
                raise ValueError(
                    f"control.writes.{name}: {'an' if point.table == 'input' else 'a'} "
                    f"{point.table} point cannot be written (only "
                    "holding registers and coils can)"
                )
            if (
                point is not None
                and point.type == "bool"
                and (limit.min is not None or limit.max is not None)
            ):
                raise ValueError(f"control.writes.{name}: a bool point takes no min or max")
        if self.control.writes and not self.control.channels:
            raise ValueError(
                "control.channels: writes are listed but no channel may write; give "
                'channels = ["method"] (and/or "c2d", "twin")'
            )

    @property
    def endpoint(self) -> str:
        if self.modbus is not None:
            return self.modbus.label
        assert self.ble is not None
        return self.ble.label


class MetricsSection(_Model):
    """``[metrics]``: where the Prometheus endpoint, ``/healthz`` and ``/readyz`` listen. No
    section: no listener. The default address is loopback: the exposition names every device,
    so reaching it from elsewhere is an explicit choice (``0.0.0.0:9464``)."""

    listen: str = Field(
        default="127.0.0.1:9464", description="HOST:PORT, e.g. 127.0.0.1:9464 or [::1]:9464"
    )

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{value!r} is not HOST:PORT (port 1-65535), e.g. 127.0.0.1:9464")
        return value

    @property
    def address(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


class Config(_Model):
    hub: HubConfig
    sealing: SealingConfig
    batching: BatchingConfig = BatchingConfig()
    secrets: SecretsConfig = SecretsConfig()
    gateway: GatewaySection = GatewaySection()
    store: StoreConfig = StoreConfig()
    ble: BleSection = BleSection()
    control: ControlSection = ControlSection()
    audit: AuditSection = AuditSection()
    metrics: MetricsSection | None = None
    # Modbus links (tcp, rtu, rtu-over-tcp) shared by the devices that name them.
    links: list[ModbusLinkConfig] = Field(default_factory=list)
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
            if device.modbus is not None and device.modbus.link is not None:
                self._check_unit(index, device)
            elif device.modbus is not None:
                key = (str(device.modbus.host), device.modbus.port, device.modbus.unit)
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

    @model_validator(mode="after")
    def _unique_links(self) -> Config:
        names: dict[str, int] = {}
        serial: dict[str, int] = {}
        for index, link in enumerate(self.links):
            if link.name in names:
                raise ValueError(
                    f"links[{index}].name: {link.name!r} is already links[{names[link.name]}]"
                )
            names[link.name] = index
            if link.type == "rtu":
                if link.port in serial:
                    raise ValueError(
                        f"links[{index}].port: {link.port} is already links[{serial[link.port]}]"
                        " (one serial port is one bus: put its units on one link)"
                    )
                serial[link.port] = index
        return self

    def _check_unit(self, index: int, device: DeviceConfig) -> None:
        assert device.modbus is not None and device.modbus.link is not None
        modbus, name = device.modbus, device.modbus.link
        link = self.link_named(name)
        if link is None:
            known = ", ".join(repr(k.name) for k in self.links) or "none"
            raise ValueError(
                f"devices[{index}].modbus.link: no [[links]] entry is named {name!r} "
                f"(links: {known})"
            )
        wide = too_wide(device.points, modbus.on(link).max_registers)
        if wide is not None:
            raise ValueError(f"devices[{index}].{wide} (link {name!r})")
        low, high = UNIT_RANGES.get(link.type, (0, 255))
        if not low <= modbus.unit <= high:
            raise ValueError(
                f"devices[{index}].modbus.unit: {modbus.unit} is not a unit id on {link.type} "
                f"link {name!r} ({low} to {high})"
            )
        for other in self.devices[:index]:
            if other.modbus is not None and other.modbus.link == name:
                if other.modbus.unit == modbus.unit:
                    raise ValueError(
                        f"devices[{index}].modbus: link {name!r} unit {modbus.unit} is already "
                        f"bound to device {other.id!r}"
                    )

    def link_named(self, name: str) -> ModbusLinkConfig | None:
        return next((link for link in self.links if link.name == name), None)

    def transport_of(self, device: DeviceConfig) -> str:
        """What the device's evidence says it was seen on: ``ble``, or its link's type."""
        if device.modbus is None:
            return "ble"
        return self.link_of(device).transport

    def link_of(self, device: DeviceConfig) -> ModbusLinkConfig:
        """A Modbus device's link: the configured one it names, or its own implicit TCP link."""
        assert device.modbus is not None
        if device.modbus.link is None:
            return implicit_link(device.id, device.modbus)
        link = self.link_named(device.modbus.link)
        assert link is not None  # validated
        return link

    def modbus_links(self) -> list[tuple[ModbusLinkConfig, list[DeviceConfig]]]:
        """Each link to poll with the enabled devices on it: one implicit link per device
        that gives its own host, then every configured link that has a device, in order."""
        out: list[tuple[ModbusLinkConfig, list[DeviceConfig]]] = []
        shared: dict[str, list[DeviceConfig]] = {k.name: [] for k in self.links}
        for device in self.devices:
            if not device.enabled or device.modbus is None:
                continue
            if device.modbus.link is None:
                out.append((self.link_of(device), [device]))
            else:
                shared[device.modbus.link].append(device)
        out += [(link, shared[link.name]) for link in self.links if shared[link.name]]
        return out
