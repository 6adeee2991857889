"""The only shapes a gateway config can take.

A config is TOML validated by pydantic with ``extra="forbid"``. Paths are relative to the config
file's folder. A bad file raises :class:`ConfigError` naming the file, each bad field's path
(``devices[3].points[2].type``) and the reason; nothing starts from a config that was refused.
"""

from __future__ import annotations

import os
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

from gateway.errors import ConfigError

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
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    keepalive: int = Field(default=60, ge=5, le=1767)
    connect_rate: float = Field(default=100.0, gt=0, description="new connections per second")
    send_rate: float = Field(
        default=0.0,
        ge=0,
        description="messages per second across all devices, backlog included (0: unlimited)",
    )
    backoff_min: float = Field(default=0.5, gt=0)
    backoff_max: float = Field(default=30.0, gt=0)
    connect_timeout: float = Field(default=10.0, gt=0)

    _ca = field_validator("ca_file")(_existing_file)


class BatchingConfig(_Model):
    max_bytes: int = Field(default=4000, ge=512, le=262_144)
    max_age: float = Field(default=1.0, gt=0, le=3600)


class SealingConfig(_Model):
    keyring: FilePath
    key_id: str = Field(min_length=1, max_length=64)

    _keyring = field_validator("keyring")(_existing_file)


class SecretsConfig(_Model):
    passphrase_env: str = "FIELDGATE_KEY_PASSPHRASE"
    passphrase_file: FilePath | None = None

    @field_validator("passphrase_file")
    @classmethod
    def _file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else _existing_file(value, info)

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

    _state = field_validator("state_dir")(_resolve)


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


class DeviceConfig(_Model):
    id: str = Field(pattern=DEVICE_ID_PATTERN)
    enabled: bool = True
    cert: FilePath = Field(description="PEM: the device leaf, then the intermediate")
    key: FilePath = Field(description="PEM: encrypted PKCS#8 private key")
    modbus: ModbusEndpoint
    points: list[Point] = Field(min_length=1)

    _files = field_validator("cert", "key")(_existing_file)

    @model_validator(mode="after")
    def _unique_points(self) -> DeviceConfig:
        seen: set[str] = set()
        for point in self.points:
            if point.name in seen:
                raise ValueError(f"point name {point.name!r} is used twice")
            seen.add(point.name)
        return self


class Config(_Model):
    hub: HubConfig
    sealing: SealingConfig
    batching: BatchingConfig = BatchingConfig()
    secrets: SecretsConfig = SecretsConfig()
    gateway: GatewaySection = GatewaySection()
    store: StoreConfig = StoreConfig()
    devices: list[DeviceConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_devices(self) -> Config:
        seen: dict[str, int] = {}
        endpoints: dict[tuple[str, int, int], str] = {}
        for index, device in enumerate(self.devices):
            if device.id in seen:
                raise ValueError(
                    f"devices[{index}].id: {device.id!r} is already devices[{seen[device.id]}]"
                )
            seen[device.id] = index
            key = (device.modbus.host, device.modbus.port, device.modbus.unit)
            if key in endpoints:
                raise ValueError(
                    f"devices[{index}].modbus: {key[0]}:{key[1]} unit {key[2]} is already bound to "
                    f"device {endpoints[key]!r}"
                )
            endpoints[key] = device.id
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
        return Config.model_validate(data, context={"base": base, "check_files": check_files})
    except ValidationError as err:
        problems = []
        for error in err.errors():
            where = _loc(error["loc"])
            reason = _reason(error)
            problems.append(f"{where}: {reason}" if where else reason)
        raise ConfigError(path, problems) from err


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
