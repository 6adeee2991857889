"""The simulated BLE fleet's description: peripherals, their keys, their values, their faults.

A peripheral's measurements are a pure function of (seed, counter) (:func:`measurement_raw`), so
tests compare what the hub received exactly.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import dataclass

from adapters.ble import gatt

BOND_MODES = ("none", "just-works", "passkey")
NOTIFY_MODES = ("good", "garbage", "short")
HMAC_MODES = ("good", "wrong", "replay")


# -- values -------------------------------------------------------------------------------------


def measurement_raw(seed: int, counter: int) -> tuple[int, int, int, int]:
    """The raw measurement a peripheral sends as its ``counter``-th notification."""
    temperature = int(2000 + 500 * math.sin(counter / 50.0 + seed)) + (counter * 7 + seed) % 11
    humidity = 4000 + (counter * 37 + seed * 101) % 3000
    battery = 100 - (counter // 1000 + seed) % 60
    return counter & 0xFFFFFFFF, temperature, humidity, battery


def setpoint_raw(seed: int) -> int:
    """The setpoint a peripheral holds until written: 20.00 degC plus a tenth per seed."""
    return 2000 + 10 * (seed % 100)


MEASUREMENT_DECODER = gatt.Decoder(
    gatt.MEASUREMENT_FORMAT,
    (
        gatt.Field("counter"),
        gatt.Field("temperature", 0.01),
        gatt.Field("humidity", 0.01),
        gatt.Field("battery"),
    ),
)


def fleet_key(secret: bytes, device_id: str) -> bytes:
    """A peripheral's challenge key, derived from the fleet secret kept beside the PKI."""
    return hmac.new(secret, b"fieldgate-ble-key:" + device_id.encode(), hashlib.sha256).digest()


# -- the fleet's description ---------------------------------------------------------------------


@dataclass
class PeripheralSpec:
    device_id: str
    identity: str  # identity address
    seed: int
    rate: float = 1.0  # notifications per second while subscribed
    bond: str = "passkey"  # none | just-works | passkey
    passkey: int = 0
    key: bytes | None = None  # challenge key; None: no challenge characteristic
    rpa: bool = False  # advertises a resolvable private address until bonded
    app_id: str | None = None  # advertised in manufacturer data
    allowed: bool = True  # written into the gateway config
    hmac: str = "good"
    notify: str = "good"
    connect_aborts: int = 0
    connect_delay: float = 0.0
    write_error: int = 0  # ATT error code the setpoint answers writes with; 0: accepts them
    write_delay: float = 0.0  # seconds before a write to the setpoint is answered


def make_specs(
    count: int,
    *,
    prefix: str = "ble-",
    rate: float = 1.0,
    bond: str = "passkey",
    challenge: bool = True,
    rpa: int = 0,
    unknown: int = 0,
    secret: bytes = b"",
) -> list[PeripheralSpec]:
    """``count`` allow-listed peripherals (the first ``rpa`` with private addresses and app
    ids), then ``unknown`` ones that advertise the same profile but are not in the config."""
    specs = []
    for i in range(count + unknown):
        device_id = f"{prefix}{i + 1}" if i < count else f"{prefix}unknown-{i - count + 1}"
        # Static random identity addresses (the two top bits set), unique per index.
        identity = ":".join(
            f"{b:02X}" for b in (0xC0, 0xFE, 0, i >> 16 & 0xFF, i >> 8 & 0xFF, i & 0xFF)
        )
        specs.append(
            PeripheralSpec(
                device_id=device_id,
                identity=identity,
                seed=i,
                rate=rate,
                bond=bond,
                passkey=(123457 * (i + 1)) % 1_000_000,
                key=fleet_key(secret, device_id) if challenge else None,
                rpa=i < rpa,
                app_id=device_id if i < rpa else None,
                allowed=i < count,
            )
        )
    return specs


def apply_setting(spec: PeripheralSpec, key: str, value: str) -> None:
    """One ``--set ID:KEY=VALUE``; raises ValueError naming what is wrong."""
    if key == "bond":
        if value not in BOND_MODES:
            raise ValueError(f"bond must be one of {', '.join(BOND_MODES)}")
        spec.bond = value
    elif key == "hmac":
        if value not in HMAC_MODES:
            raise ValueError(f"hmac must be one of {', '.join(HMAC_MODES)}")
        spec.hmac = value
    elif key == "notify":
        if value not in NOTIFY_MODES:
            raise ValueError(f"notify must be one of {', '.join(NOTIFY_MODES)}")
        spec.notify = value
    elif key == "rate":
        spec.rate = float(value)
    elif key == "connect-aborts":
        spec.connect_aborts = int(value)
    elif key == "connect-delay":
        spec.connect_delay = float(value)
    elif key == "write-error":
        spec.write_error = _att_code(value)
    elif key == "write-delay":
        spec.write_delay = float(value)
    else:
        raise ValueError(
            f"unknown setting {key!r}: bond, hmac, notify, rate, connect-aborts, connect-delay, "
            "write-error, write-delay"
        )


def _att_code(value: str) -> int:
    """An ATT error code (``0x80``, ``128``), or ``none``/``0``/empty: writes are accepted."""
    if value.strip().lower() in ("", "none", "0"):
        return 0
    try:
        code = int(value, 0)
    except ValueError:
        raise ValueError(
            f"write-error must be an ATT error code such as 0x80, not {value!r}"
        ) from None
    if not 0x01 <= code <= 0xFF:
        raise ValueError(f"write-error must be an ATT error code 0x01 to 0xFF, not {value!r}")
    return code
