"""The module twin, as fieldgate reads and writes it. Pure: no SDK, no I/O but the file read
it is handed.

Desired properties (IoT Hub's property names cannot hold ``.``, so ``fieldgate.config`` is the
path ``desired["fieldgate"]["config"]``):

- ``fieldgate.config``: the gateway config, the same schema as the TOML file, as JSON;
  validated by the same models (:func:`gateway.config.loading.validate`). A refusal names
  ``twin:fieldgate.config.<field>``.
- or ``fieldgate.config_file``: ``{"path": "/abs/path.toml", "sha256": "<hex>"}`` for a config
  larger than a twin takes (32 KB per section, 4 KB per property), in a mounted volume; the
  file is used only if its SHA-256 is the one named.

The ``hub`` section comes from the runtime, not the twin: ``hostname`` (the IoT Hub's, for the
username), ``address`` and ``server_name`` (edgeHub's, IOTEDGE_GATEWAYHOSTNAME), ``port``
(8883) and ``ca_file`` (the workload API's trust bundle). The twin may tune the rest
(``max_inflight``, ``keepalive``, rates, backoff); naming one of those five is refused.

Reported properties: :func:`reported` under ``fieldgate``: the config (desired ``$version``,
status, source, hash, the refused field and why), devices by state, store depth, last error.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from adapters.base import DOWN, QUARANTINED, STARTING, UP
from gateway.config import Config
from gateway.config.loading import validate
from gateway.core import codec
from gateway.core.errors import ConfigError
from gateway.edge.env import EDGEHUB_PORT, EdgeEnv

FIELDGATE = "fieldgate"
CONFIG = "config"
CONFIG_FILE = "config_file"
TWIN_SOURCE = f"twin:{FIELDGATE}.{CONFIG}"
FILE_SOURCE = f"twin:{FIELDGATE}.{CONFIG_FILE}"
ENV_HUB_FIELDS = ("hostname", "address", "server_name", "port", "ca_file")
DEVICE_STATES = (STARTING, UP, DOWN, QUARANTINED)
SHA256 = re.compile(r"^[0-9a-f]{64}$")

Status = Literal["applied", "refused", "failed", "pending"]


def version_of(desired: Mapping[str, Any]) -> int:
    version = desired.get("$version", 0)
    return version if isinstance(version, int) else 0


@dataclass(frozen=True)
class Desired:
    """A validated config from the twin and where it came from."""

    version: int
    source: str  # twin:fieldgate.config, or twin:fieldgate.config_file (path)
    sha256: str
    config: Config


class TwinConfigError(ConfigError):
    """A desired config refused: ``field`` names the first bad one as the twin has it."""

    def __init__(self, source: str, problems: list[str], version: int) -> None:
        super().__init__(source, problems)
        self.version = version
        first = problems[0] if problems else ""
        where, sep, why = first.partition(": ")
        self.field = f"{source}.{where}" if sep and " " not in where else source
        self.reason = why if sep and " " not in where else first


def _section(desired: Mapping[str, Any], version: int) -> tuple[str, Any]:
    ours = desired.get(FIELDGATE)
    if not isinstance(ours, dict):
        raise TwinConfigError(
            f"twin:{FIELDGATE}",
            [f"desired properties have no {FIELDGATE}.{CONFIG} or {FIELDGATE}.{CONFIG_FILE}"],
            version,
        )
    given = [name for name in (CONFIG, CONFIG_FILE) if ours.get(name) is not None]
    if len(given) != 1:
        why = "both are set: give one" if given else "neither is set"
        raise TwinConfigError(
            f"twin:{FIELDGATE}",
            [f"{FIELDGATE}.{CONFIG} or {FIELDGATE}.{CONFIG_FILE}: {why}"],
            version,
        )
    return given[0], ours[given[0]]


def _from_file(
    value: Any, read_file: Callable[[Path], bytes], version: int
) -> tuple[str, dict[str, Any], str, Path]:
    def refuse(where: str, why: str) -> TwinConfigError:
        return TwinConfigError(FILE_SOURCE, [f"{where}: {why}"], version)

    if not isinstance(value, dict):
        raise refuse("", "an object {path, sha256}")
    unknown = sorted(set(value) - {"path", "sha256"})
    if unknown:
        raise refuse(unknown[0], "unknown field (check its spelling)")
    path, digest = value.get("path"), value.get("sha256")
    if not isinstance(path, str) or not path.startswith("/"):
        raise refuse("path", f"{path!r} is not an absolute path (a file in a mounted volume)")
    if not isinstance(digest, str) or not SHA256.match(digest.lower()):
        raise refuse("sha256", f"{digest!r} is not a SHA-256 in hex (64 digits)")
    try:
        raw = read_file(Path(path))
    except OSError as err:
        raise refuse("path", f"cannot read {path}: {err.strerror or err}") from err
    actual = hashlib.sha256(raw).hexdigest()
    if actual != digest.lower():
        raise refuse("sha256", f"{path} has SHA-256 {actual}, not the {digest.lower()} named")
    source = f"{FILE_SOURCE} ({path})"
    try:
        if path.endswith(".json"):
            doc = codec.loads(raw)
        else:
            doc = tomllib.loads(raw.decode("utf-8"))
    except (codec.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise TwinConfigError(
            source, [f"not valid {'JSON' if path.endswith('.json') else 'TOML'}: {err}"], version
        ) from err
    if not isinstance(doc, dict):
        raise TwinConfigError(source, ["a config is an object"], version)
    return source, doc, actual, Path(path).parent


def with_edge_hub(
    doc: Mapping[str, Any], env: EdgeEnv, ca_file: Path, source: str, version: int
) -> dict[str, Any]:
    """The config with its hub section from the runtime; refused if the twin names one of the
    fields the runtime owns."""
    hub = doc.get("hub", {})
    if not isinstance(hub, dict):
        raise TwinConfigError(source, ["hub: a table of hub settings"], version)
    owned = [name for name in ENV_HUB_FIELDS if name in hub]
    if owned:
        raise TwinConfigError(
            source,
            [f"hub.{owned[0]}: set by the IoT Edge runtime in module mode (not in the twin)"],
            version,
        )
    return {
        **doc,
        "hub": {
            **hub,
            "hostname": env.iothub_hostname,
            "address": env.gateway_hostname,
            "server_name": env.gateway_hostname,
            "port": EDGEHUB_PORT,
            "ca_file": str(ca_file),
        },
    }


def desired_config(
    desired: Mapping[str, Any],
    env: EdgeEnv,
    ca_file: Path,
    *,
    read_file: Callable[[Path], bytes] = Path.read_bytes,
    base: Path | None = None,
    check_files: bool = True,
) -> Desired:
    """The config the desired properties give, validated, or :class:`TwinConfigError`."""
    version = version_of(desired)
    name, value = _section(desired, version)
    if name == CONFIG:
        if not isinstance(value, dict):
            raise TwinConfigError(TWIN_SOURCE, ["a config is an object"], version)
        source, doc = TWIN_SOURCE, value
        # The hash of the config as sorted JSON: the same config hashes the same however
        # the twin orders its keys.
        canonical = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
        digest = hashlib.sha256(canonical).hexdigest()
        folder = base
    else:
        source, doc, digest, folder = _from_file(value, read_file, version)
    full = with_edge_hub(doc, env, ca_file, source, version)
    try:
        config = validate(full, source, base=folder, check_files=check_files)
    except ConfigError as err:
        raise TwinConfigError(source, err.problems, version) from err
    return Desired(version, source, digest, config)


# -- reported ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigState:
    """What the module did with a desired config."""

    version: int
    status: Status
    source: str | None = None
    sha256: str | None = None
    field: str | None = None
    reason: str | None = None

    @classmethod
    def refused(cls, err: TwinConfigError) -> ConfigState:
        return cls(err.version, "refused", err.path, None, err.field, err.reason)


def reported(
    config: ConfigState | None,
    states: Mapping[str, str],
    store: Mapping[str, int],
    last_error: str | None,
) -> dict[str, Any]:
    """The ``fieldgate`` section of the module's reported properties. ``null`` clears a
    property in a twin, so absent values are sent as ``None``."""
    # Every state named, zeros too: a reported patch merges, so a state left out would keep
    # its old count in the twin.
    by_state = dict.fromkeys(DEVICE_STATES, 0)
    for state in states.values():
        by_state[state] = by_state.get(state, 0) + 1
    return {
        FIELDGATE: {
            CONFIG: None
            if config is None
            else {
                "version": config.version,
                "status": config.status,
                "source": config.source,
                "sha256": config.sha256,
                "field": config.field,
                "reason": config.reason,
            },
            "devices": {"total": len(states), **by_state},
            "store": dict(store),
            "last_error": last_error,
        }
    }


class ReportPacer:
    """Reported patches on change only, and at most one per ``interval`` seconds (IoT Hub's
    twin updates are 50/s per hub on S1, shared with every device and module)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.sent: dict[str, Any] | None = None
        self.at = float("-inf")

    def wait(self, report: dict[str, Any], now: float) -> float | None:
        """None: nothing to send (unchanged); else seconds to wait before sending (0: now)."""
        if report == self.sent:
            return None
        return max(0.0, self.at + self.interval - now)

    def done(self, report: dict[str, Any], now: float) -> None:
        self.sent, self.at = report, now
