"""Module identities and their SAS tokens, as IoT Hub and edgeHub check them. Pure.

A module's token (what azure-iot-device builds with the workload API's signature) is
``SharedAccessSignature sr={quote(resource)}&sig={quote(b64 HMAC)}&se={expiry}`` where the
resource is ``{hub}/devices/{device}/modules/{module}`` and the HMAC-SHA256, under the
module's key, covers ``{quote(resource)}\\n{expiry}`` (the SDK's ``sastoken.py``). Its MQTT
CONNECT has client id ``{device}/{module}`` and username
``{hub}/{device}/{module}/?api-version=...``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote

from gateway.testbed.localhub.control import module_identity
from gateway.testbed.localhub.front import Connect, judge_publish

TOKEN_PREFIX = "SharedAccessSignature "


@dataclass(frozen=True)
class Module:
    """One module identity: its key (the runtime keeps it; the module never sees it) and the
    generation id the runtime gave the module's current instance."""

    device: str
    module: str
    key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    generation_id: str = field(default_factory=lambda: secrets.token_hex(8))

    @property
    def identity(self) -> str:
        return module_identity(self.device, self.module)

    def resource(self, hub: str) -> str:
        return f"{hub}/devices/{self.device}/modules/{self.module}"


def sign(key: bytes, data: bytes) -> str:
    """What the workload API's ``sign`` answers: base64 of HMAC-SHA256(key, data)."""
    return base64.b64encode(hmac.new(key, data, hashlib.sha256).digest()).decode()


def token(key: bytes, resource: str, expiry: int) -> str:
    """A SAS token as the SDK builds it (tests make wrong and expired ones with this)."""
    sr = quote(resource, safe="")
    sig = sign(key, f"{sr}\n{expiry}".encode())
    return f"{TOKEN_PREFIX}sr={sr}&sig={quote(sig, safe='')}&se={expiry}"


def judge_token(text: str, key: bytes, resource: str, now: float) -> str | None:
    """Why this token does not authenticate ``resource`` (None: it does)."""
    if not text.startswith(TOKEN_PREFIX):
        return "the password is not a SharedAccessSignature token"
    fields = dict(parse_qsl(text[len(TOKEN_PREFIX) :], keep_blank_values=True))
    missing = [name for name in ("sr", "sig", "se") if not fields.get(name)]
    if missing:
        return f"SAS token without {', '.join(missing)}"
    # parse_qsl has undone the URL encoding of every field.
    if fields["sr"].lower() != resource.lower():
        return f"SAS token for {fields['sr']!r}, not {resource!r}"
    try:
        expiry = int(fields["se"])
    except ValueError:
        return f"SAS token expiry {fields['se']!r} is not a number"
    if expiry <= now:
        return f"SAS token expired {int(now - expiry)} s ago (se={expiry})"
    expected = sign(key, f"{quote(fields['sr'], safe='')}\n{expiry}".encode())
    if not hmac.compare_digest(expected.encode(), fields["sig"].encode()):
        return "SAS token signature does not match the module's key"
    return None


def judge_module_connect(
    connect: Connect, modules: Mapping[str, Module], hub: str, now: float
) -> tuple[str | None, str | None]:
    """A certificate-less CONNECT: (the module identity it claims, why it is refused or None).

    ``modules`` is keyed by ``{device}/{module}`` (the MQTT client id of a module)."""
    if connect.level != 4:
        return None, f"MQTT protocol level {connect.level}: edgeHub speaks 3.1.1 (level 4) here"
    module = modules.get(connect.client_id)
    if module is None:
        return None, f"client id {connect.client_id!r} is no module identity of this edge device"
    parts = (connect.username or "").split("/", 3)
    if (
        len(parts) != 4
        or parts[0].lower() != hub.lower()
        or parts[1:3] != [module.device, module.module]
        or not parts[3].startswith("?api-version=")
    ):
        return module.identity, (
            f"username {connect.username!r} is not "
            f"'{hub}/{module.device}/{module.module}/?api-version=...'"
        )
    why = judge_token(
        (connect.password or b"").decode("utf-8", "replace"), module.key, module.resource(hub), now
    )
    if why is None and connect.will_topic is not None:
        refused = judge_publish(module.identity, connect.will_topic, (connect.flags >> 3) & 3)
        if refused:
            why = f"will topic {connect.will_topic!r}: {refused}"
    return module.identity, why


def checker(
    modules: Mapping[str, Module], hub: str, clock: Callable[[], float]
) -> Callable[[Connect], tuple[str | None, str | None]]:
    """The front's ``sas=`` hook for these modules."""
    return lambda connect: judge_module_connect(connect, modules, hub, clock())
