"""The gateway's config: models (:mod:`.models`, composing the adapters' own) and loading
(:mod:`.loading`). ``from gateway.config import X`` keeps working for every name callers use."""

from adapters.ble.config import (
    BleChallenge,
    BleCharacteristic,
    BleEndpoint,
    BleSection,
    BleValue,
)
from adapters.modbus.config import REGISTER_WIDTH, ModbusEndpoint, Point, overlapping_points
from gateway.config.loading import load, render_toml, validate
from gateway.config.models import (
    DEVICE_ID_PATTERN,
    MAX_KEEPALIVE,
    BatchingConfig,
    Config,
    DeviceConfig,
    GatewaySection,
    HubConfig,
    SealingConfig,
    SecretsConfig,
    StoreConfig,
)

__all__ = [
    "DEVICE_ID_PATTERN",
    "MAX_KEEPALIVE",
    "REGISTER_WIDTH",
    "BatchingConfig",
    "BleChallenge",
    "BleCharacteristic",
    "BleEndpoint",
    "BleSection",
    "BleValue",
    "Config",
    "DeviceConfig",
    "GatewaySection",
    "HubConfig",
    "ModbusEndpoint",
    "Point",
    "SealingConfig",
    "SecretsConfig",
    "StoreConfig",
    "load",
    "overlapping_points",
    "render_toml",
    "validate",
]
