"""Checks of a validated config against the files it names, run by ``config.load`` when it
checks files (``fieldgate run``): each problem names its field, so a refused start is exit 2
with the field path, and nothing has been written yet.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from adapters.modbus.config import TcpLink
from gateway.config import Config, DeviceConfig
from gateway.identity import checks as identity

Resolver = Callable[[str], set[str]]
# Names are resolved together, and the start waits this long at most: a plant whose DNS is
# down must not wait seconds per device name before it may start.
RESOLVE_WITHIN = 3.0


def problems(config: Config) -> list[str]:
    """Every problem found, one line each: ``devices[3].cert: ...``."""
    found: list[str] = []
    found += identity.check(_credentials(config), allow_clear_keys=config.secrets.allow_clear_keys)
    found += same_endpoints(config)
    found += _modbus_tls(config)
    return found


def _modbus_tls(config: Config) -> list[str]:
    """The gateway's client identity on each Modbus/TCP Security link."""
    found: list[str] = []
    where: list[tuple[str, Any]] = [
        (f"devices[{index}].modbus.tls", device.modbus.tls)
        for index, device in enumerate(config.devices)
        if device.enabled and device.modbus is not None
    ]
    where += [
        (f"links[{index}].tls", getattr(k, "tls", None)) for index, k in enumerate(config.links)
    ]
    for field, tls in where:
        if tls is not None:
            found += identity.check_modbus_client(
                field,
                tls.cert,
                _read(tls.cert),
                tls.key,
                _read(tls.key),
                allow_clear_keys=config.secrets.allow_clear_keys,
            )
    return found


def addresses(host: str) -> set[str]:
    """The addresses a Modbus host name stands for; a name that does not resolve (DNS down, a
    name only the plant's resolver knows) stands for itself, so it is compared by spelling."""
    try:
        return {str(ipaddress.ip_address(host))}
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return {host}
    return {str(info[4][0]) for info in infos} or {host}


def resolve_all(
    hosts: Iterable[str], resolve: Resolver = addresses, within: float = RESOLVE_WITHIN
) -> dict[str, set[str]]:
    """Every name's addresses, resolved concurrently; a name still unresolved after
    ``within`` seconds stands for itself (compared by its spelling)."""
    names = sorted(set(hosts))
    if not names:
        return {}
    pool = ThreadPoolExecutor(max_workers=min(64, len(names)), thread_name_prefix="resolve")
    try:
        futures = {name: pool.submit(resolve, name) for name in names}
        wait(futures.values(), timeout=within)
        return {
            name: future.result() if future.done() and not future.exception() else {name}
            for name, future in futures.items()
        }
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _tcp_endpoint(config: Config, device: DeviceConfig) -> tuple[str, int, int] | None:
    """Where a Modbus TCP device is: its own host, or its ``tcp`` link's (host, port, unit)."""
    modbus = device.modbus
    if modbus is None:
        return None
    if modbus.host is not None:
        return modbus.host, modbus.port, modbus.unit
    link = config.link_named(modbus.link or "")
    if isinstance(link, TcpLink):
        return link.host, link.port, modbus.unit
    return None  # serial, or RTU through TCP: (link, unit) is checked by the config


def same_endpoints(config: Config, resolve: Resolver = addresses) -> list[str]:
    """Two Modbus devices at one address, port and unit under two names (``localhost`` and
    ``127.0.0.1``, or a device's own host and a ``tcp`` link's): both would poll the same
    device and report it under two identities."""
    found: list[str] = []
    where = {i: _tcp_endpoint(config, d) for i, d in enumerate(config.devices)}
    cache = resolve_all((e[0] for e in where.values() if e is not None), resolve)
    owners: dict[tuple[str, int, int], int] = {}
    for index, endpoint in where.items():
        if endpoint is None:
            continue
        host, port, unit = endpoint
        for address in sorted(cache[host]):
            first = owners.setdefault((address, port, unit), index)
            if first != index:
                other = config.devices[first]
                ohost, oport, ounit = where[first] or endpoint
                found.append(
                    f"devices[{index}].modbus: {host}:{port} unit {unit} is "
                    f"{ohost}:{oport} unit {ounit}, already "
                    f"bound to device {other.id!r} (both are {address})"
                )
                break
    return found


def _credentials(config: Config) -> Iterator[identity.Credential]:
    for index, device in enumerate(config.devices):
        if not device.enabled:
            continue
        yield identity.Credential(
            where=f"devices[{index}]",
            device_id=device.id,
            auth=device.auth,
            cert_path=device.cert,
            cert_pem=_read(device.cert),
            key_path=device.key,
            key_pem=_read(device.key),
        )


def _read(path: Path) -> bytes:
    """A file's bytes; one that cannot be read counts as empty, which the checks name."""
    try:
        return path.read_bytes()
    except OSError:
        return b""
