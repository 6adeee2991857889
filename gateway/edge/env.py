"""What the IoT Edge runtime tells a module in its environment, read and checked. Pure.

The runtime (edgelet, 1.6) sets these in every module's container; azure-iot-device's
``create_from_edge_environment`` reads them again itself. They are checked here first so that a
module started by hand gets exit 2 naming each missing one, instead of the SDK's "IoT Edge
environment not configured correctly".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.core.errors import FieldgateError

WORKLOAD_URI = "IOTEDGE_WORKLOADURI"
DEVICE_ID = "IOTEDGE_DEVICEID"
MODULE_ID = "IOTEDGE_MODULEID"
GENERATION_ID = "IOTEDGE_MODULEGENERATIONID"
IOTHUB_HOSTNAME = "IOTEDGE_IOTHUBHOSTNAME"
GATEWAY_HOSTNAME = "IOTEDGE_GATEWAYHOSTNAME"
API_VERSION = "IOTEDGE_APIVERSION"
AUTH_SCHEME = "IOTEDGE_AUTHSCHEME"
REQUIRED = (
    WORKLOAD_URI,
    DEVICE_ID,
    MODULE_ID,
    GENERATION_ID,
    IOTHUB_HOSTNAME,
    GATEWAY_HOSTNAME,
    API_VERSION,
    AUTH_SCHEME,
)
# The only scheme the runtime gives modules: tokens signed by the workload API.
SAS_SCHEME = "sasToken"
# edgeHub's MQTT port (azure-iot-device cannot use another).
EDGEHUB_PORT = 8883


class EdgeEnvError(FieldgateError):
    """Module mode cannot start: the runtime's environment is missing or wrong."""

    exit_code = 2


@dataclass(frozen=True)
class EdgeEnv:
    workload_uri: str
    device_id: str
    module_id: str
    generation_id: str
    iothub_hostname: str
    gateway_hostname: str
    api_version: str
    auth_scheme: str


def detected(environ: Mapping[str, str]) -> bool:
    """Whether this process looks started by the IoT Edge runtime (any IOTEDGE_ variable)."""
    return any(name in environ for name in REQUIRED)


def read(environ: Mapping[str, str]) -> EdgeEnv:
    """The runtime's variables, or :class:`EdgeEnvError` naming every missing or bad one."""
    missing = [name for name in REQUIRED if not environ.get(name, "").strip()]
    if missing:
        raise EdgeEnvError(
            f"not started by the IoT Edge runtime: {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set (module mode needs {len(REQUIRED)} "
            "IOTEDGE_* variables)"
        )
    values = {name: environ[name].strip() for name in REQUIRED}
    problems = []
    if values[AUTH_SCHEME] != SAS_SCHEME:
        problems.append(f"{AUTH_SCHEME}={values[AUTH_SCHEME]!r}: only {SAS_SCHEME!r} is supported")
    if not values[WORKLOAD_URI].startswith("unix://"):
        problems.append(
            f"{WORKLOAD_URI}={values[WORKLOAD_URI]!r}: the workload API is a unix socket "
            "(unix:///var/run/iotedge/workload.sock)"
        )
    for name in (DEVICE_ID, MODULE_ID):
        if "/" in values[name]:
            problems.append(f"{name}={values[name]!r}: an IoT Hub id has no '/'")
    if problems:
        raise EdgeEnvError("; ".join(problems))
    return EdgeEnv(*(values[name] for name in REQUIRED))
