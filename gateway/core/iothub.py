"""IoT Hub's device protocol over MQTT, as facts: every topic, the username, the property bag.

The one home of these facts (a second copy would drift at the next API version). Pure: the
uplink session, the consumer side, the meter size of an envelope and the hub stand-in all read
them here. It sits in core because what an envelope costs at IoT Hub's meter (its body plus the
properties riding in the topic) is core's concern.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
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
# Every device's telemetry, as the service side reads it; and every module's (IoT Edge: a
# module's output routed upstream, such as fieldgate's audit stream in module mode).
ALL_TELEMETRY = "devices/+/messages/events/#"
ALL_MODULE_TELEMETRY = "devices/+/modules/+/messages/events/#"


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


def _device_topic(topic: str, leaf: str, what: str) -> tuple[str, dict[str, str]]:
    """``devices/{id}/messages/{leaf}/{props}`` -> (device id, properties)."""
    parts = topic.split("/", 4)
    if len(parts) < 4 or parts[0] != "devices" or parts[2:4] != ["messages", leaf]:
        raise ValueError(f"not a {what} topic: {topic!r}")
    return parts[1], decode_properties(parts[4] if len(parts) == 5 else "")


def parse_telemetry_topic(topic: str) -> tuple[str, dict[str, str]]:
    """``devices/{id}/messages/events/{props}`` -> (device id, properties)."""
    return _device_topic(topic, "events", "telemetry")


def module_sender(device_id: str, module_id: str) -> str:
    """A module's name as one id (``{device}.{module}``): the id fieldgate gives its audit
    chain in module mode, and the sender a consumer sees on the module's messages. IoT Hub ids
    may hold characters a chain id may not (``@$!()',=``...): those become ``-``; a name longer
    than 128 characters is cut and ends in a digest of the whole."""
    name = re.sub(r"[^A-Za-z0-9._:-]", "-", f"{device_id}.{module_id}")
    if not name[:1].isalnum():
        name = "m" + name
    if len(name) > 128:
        name = name[:111] + "-" + hashlib.sha256(name.encode()).hexdigest()[:16]
    return name


def parse_sender_topic(topic: str) -> tuple[str, dict[str, str]]:
    """A device's or a module's telemetry topic -> (the sending identity, properties); a
    module's (``devices/{d}/modules/{m}/messages/events/{props}``) is :func:`module_sender`."""
    parts = topic.split("/", 6)
    if len(parts) >= 6 and parts[0] == "devices" and parts[2] == "modules":
        if parts[4:6] != ["messages", "events"]:
            raise ValueError(f"not a module telemetry topic: {topic!r}")
        props = decode_properties(parts[6] if len(parts) == 7 else "")
        return module_sender(unquote(parts[1]), unquote(parts[3])), props
    return parse_telemetry_topic(topic)


# -- the cloud-to-device side ----------------------------------------------------------------
# What a device's session subscribes to (IoT Hub scopes each to the connection's identity).
METHOD_REQUESTS = "$iothub/methods/POST/#"
TWIN_RESPONSES = "$iothub/twin/res/#"
TWIN_DESIRED = "$iothub/twin/PATCH/properties/desired/#"

# Sizes IoT Hub takes (iot-hub-devguide-quotas-throttling): larger is refused by the hub, so a
# larger request cannot be genuine.
METHOD_PAYLOAD_MAX = 128 * 1024
C2D_PAYLOAD_MAX = 64 * 1024
TWIN_SECTION_MAX = 32 * 1024  # desired and reported, each
# Twin updates per second per hub on Free/S1 (50/s shared by every device and module).
TWIN_UPDATES_PER_S = 50.0
# Method response statuses a device may answer with are any int; these are the hub's own.
METHOD_TIMEOUT_STATUS = 504
DEVICE_NOT_CONNECTED_STATUS = 404


def c2d_filter(device_id: str) -> str:
    return f"devices/{device_id}/messages/devicebound/#"


def c2d_topic(device_id: str, props: dict[str, str]) -> str:
    """The topic a C2D message reaches ``device_id`` on; ``$.mid`` is its message id."""
    return f"devices/{device_id}/messages/devicebound/{encode_properties(props)}"


def parse_c2d_topic(topic: str) -> tuple[str, dict[str, str]]:
    """``devices/{id}/messages/devicebound/{props}`` -> (device id, properties)."""
    return _device_topic(topic, "devicebound", "cloud-to-device")


C2D_MESSAGE_ID = "$.mid"


def _query(topic: str, prefix: str) -> dict[str, str] | None:
    """The ``?a=b&c=d`` part of ``prefix...?query``; None when ``topic`` is not under prefix."""
    if not topic.startswith(prefix):
        return None
    _, sep, query = topic.partition("?")
    return decode_properties(query) if sep else {}


def method_request_topic(name: str, rid: str) -> str:
    return f"$iothub/methods/POST/{name}/?$rid={rid}"


def parse_method_request(topic: str) -> tuple[str, str] | None:
    """``$iothub/methods/POST/{name}/?$rid={rid}`` -> (name, rid); None if it is not one."""
    query = _query(topic, "$iothub/methods/POST/")
    if query is None:
        return None
    name = topic[len("$iothub/methods/POST/") :].partition("?")[0].rstrip("/")
    return name, query.get("$rid", "")


def method_response_topic(status: int, rid: str) -> str:
    return f"$iothub/methods/res/{status}/?$rid={rid}"


def _answer(topic: str, prefix: str) -> tuple[int, dict[str, str]] | None:
    """``{prefix}{status}/?{query}`` -> (status, query); None if it is not one."""
    query = _query(topic, prefix)
    status = topic[len(prefix) :].partition("/")[0]
    return None if query is None or not status.isdigit() else (int(status), query)


def parse_method_response(topic: str) -> tuple[int, str] | None:
    """``$iothub/methods/res/{status}/?$rid={rid}`` -> (status, rid)."""
    found = _answer(topic, "$iothub/methods/res/")
    return None if found is None else (found[0], found[1].get("$rid", ""))


def twin_get_topic(rid: str) -> str:
    return f"$iothub/twin/GET/?$rid={rid}"


def twin_reported_topic(rid: str) -> str:
    return f"$iothub/twin/PATCH/properties/reported/?$rid={rid}"


def twin_response_topic(status: int, rid: str, version: int | None = None) -> str:
    tail = f"&$version={version}" if version is not None else ""
    return f"$iothub/twin/res/{status}/?$rid={rid}{tail}"


def parse_twin_response(topic: str) -> tuple[int, str, int | None] | None:
    """``$iothub/twin/res/{status}/?$rid={rid}[&$version={v}]`` -> (status, rid, version)."""
    found = _answer(topic, "$iothub/twin/res/")
    if found is None:
        return None
    status, query = found
    version = query.get("$version", "")
    return status, query.get("$rid", ""), int(version) if version.isdigit() else None


def desired_patch_topic(version: int) -> str:
    return f"$iothub/twin/PATCH/properties/desired/?$version={version}"


def parse_desired_patch(topic: str) -> int | None:
    """``$iothub/twin/PATCH/properties/desired/?$version={v}`` -> v (None if it is not one, -1
    when the version is missing)."""
    query = _query(topic, "$iothub/twin/PATCH/properties/desired/")
    if query is None:
        return None
    version = query.get("$version", "")
    return int(version) if version.isdigit() else -1


def parse_twin_get(topic: str) -> str | None:
    """``$iothub/twin/GET/?$rid={rid}`` -> rid (None if it is not a twin GET)."""
    query = _query(topic, "$iothub/twin/GET/")
    return None if query is None else query.get("$rid", "")


def parse_twin_reported(topic: str) -> str | None:
    """``$iothub/twin/PATCH/properties/reported/?$rid={rid}`` -> rid (None if not one)."""
    query = _query(topic, "$iothub/twin/PATCH/properties/reported/")
    return None if query is None else query.get("$rid", "")


# A reported patch is answered with this status (and the new $version), a twin GET with 200.
TWIN_PATCHED_STATUS = 204


def merge_patch(doc: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """A twin patch applied to a twin document: nested objects merge, ``null`` deletes a
    property (IoT Hub's rule for desired and reported properties)."""
    out = dict(doc)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_patch(out[key], value)
        else:
            out[key] = value
    return out
