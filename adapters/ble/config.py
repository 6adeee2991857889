"""What a BLE device is, as config: its endpoint, its decode table (rows of
:class:`BleCharacteristic`) and the settings every BLE radio shares (:class:`BleSection`). The
adapter's own models, so that the adapter builds on ``gateway.core`` only; ``gateway.config``
composes them into a device entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from adapters.ble.gatt import ADDRESS_PATTERN, UUID_PATTERN, struct_fields, write_problem


class _Model(BaseModel):
    # No float here means anything as nan or inf: a scale of nan would turn every reading into nan.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _key_file(value: Path, info: ValidationInfo) -> Path:
    """A file the config names: relative to the config's folder (context ``base``), and it must
    exist unless the loader was told not to check files (context ``check_files``). The same
    rule as ``gateway.config.models``' file fields; kept here so that this module needs nothing
    of the gateway's."""
    context = info.context or {}
    path = value.expanduser()
    base = context.get("base")
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    if context.get("check_files", True) and not path.is_file():
        raise ValueError(f"file not found: {path}")
    return path


class BleValue(_Model):
    """One field of a characteristic's struct: its point name, scale and offset."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:/-]+$")
    scale: float = 1.0
    offset: float = 0.0
    unit: str | None = Field(default=None, max_length=16)


class BleCharacteristic(_Model):
    """A row of a BLE device's decode table.

    ``writable = true`` lets the control path write the row's one value (a GATT write with
    response, then a read back), encoded as the inverse of its decode: the same type, byte
    order, scale and offset. Only a row whose decode can be inverted may say so: one value, no
    pad bytes, a scale other than 0.
    """

    uuid: str = Field(pattern=UUID_PATTERN)
    mode: Literal["notify", "poll"] = "notify"
    period: float = Field(default=10.0, ge=0.05, le=86_400, description="poll mode: seconds")
    format: str = Field(min_length=1, max_length=64, description="struct format, e.g. '<IhHB'")
    values: list[BleValue] = Field(min_length=1)
    # Declared last: its check reads the format and values validated before it.
    writable: bool = Field(default=False, description="the control path may write its value")

    @field_validator("uuid")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()

    @field_validator("writable")
    @classmethod
    def _invertible(cls, writable: bool, info: ValidationInfo) -> bool:
        fmt, values = info.data.get("format"), info.data.get("values")
        if not writable or fmt is None or values is None:
            return writable  # a bad format or value list is reported on its own field
        try:
            struct_fields(fmt)
        except ValueError:
            return writable  # reported by the check of the format below
        problem = write_problem(fmt)
        if problem is not None:
            raise ValueError(f"cannot be true: {problem}")
        if values[0].scale == 0.0:
            raise ValueError(
                f"cannot be true: value {values[0].name!r} has scale 0, which reads every "
                "raw value as the offset and so cannot be inverted"
            )
        return writable

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
    key_file: Path = Field(description="the device's key: 64+ hex digits or 32+ raw bytes")
    max_failures: int = Field(
        default=3, ge=1, le=100, description="failures per hour before the device is held off"
    )

    _key = field_validator("key_file")(_key_file)

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
    request_timeout: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="seconds a read or write request (the control path's) waits for the device",
    )
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
