"""IoT Hub's device protocol over MQTT, as facts: every topic, the username, the property bag.

The one home of these facts (a second copy would drift at the next API version). Pure: the
uplink session, the consumer side, the meter size of an envelope and the hub stand-in all read
them here. It sits in core because what an envelope costs at IoT Hub's meter (its body plus the
properties riding in the topic) is core's concern.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import quote, unquote

if TYPE_CHECKING:
    from gateway.core.readings import Header

API_VERSION = "2021-04-12"

# The topics a device's session publishes on and receives from ("{device}": its id). IoT Hub
# scopes the $iothub/ ones to the connection's identity.
DEVICE_PUBLISHES = (
    "devices/{device}/messages/events/#",
    "$iothub/methods/res/#",
    "$iothub/twin/GET/#",
    "$iothub/twin/PATCH/properties/reported/#",
)
DEVICE_RECEIVES = (
    "devices/{device}/messages/devicebound/#",
    "$iothub/methods/POST/#",
    "$iothub/twin/res/#",
    "$iothub/twin/PATCH/properties/desired/#",
)
# Every device's telemetry, as the service side reads it.
ALL_TELEMETRY = "devices/+/messages/events/#"


def iothub_username(hub_hostname: str, device_id: str) -> str:
    return f"{hub_hostname}/{device_id}/?api-version={API_VERSION}"


def encode_properties(props: dict[str, str]) -> str:
    """IoT Hub's property bag: URL-encoded ``key=value`` pairs joined with ``&``."""
    return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in props.items())


def decode_properties(text: str) -> dict[str, str]:
    props: dict[str, str] = {}
    for pair in text.split("&"):
        if not pair:
            continue
        key, _, value = pair.partition("=")
        props[unquote(key)] = unquote(value)
    return props


def telemetry_topic(device_id: str, header: Header) -> str:
    return f"devices/{device_id}/messages/events/{encode_properties(header.properties())}"


def parse_telemetry_topic(topic: str) -> tuple[str, dict[str, str]]:
    """``devices/{id}/messages/events/{props}`` -> (device id, properties)."""
    parts = topic.split("/", 4)
    if len(parts) < 4 or parts[0] != "devices" or parts[2:4] != ["messages", "events"]:
        raise ValueError(f"not a telemetry topic: {topic!r}")
    return parts[1], decode_properties(parts[4] if len(parts) == 5 else "")
