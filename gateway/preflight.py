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

from gateway.config import Config
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


def same_endpoints(config: Config, resolve: Resolver = addresses) -> list[str]:
    """Two Modbus devices at one address, port and unit under two names (``localhost`` and
    ``127.0.0.1``): both would poll the same device and report it under two identities."""
    found: list[str] = []
    own = [d for d in config.devices if d.modbus is not None and d.modbus.host is not None]
    cache = resolve_all((str(d.modbus.host) for d in own if d.modbus is not None), resolve)
    owners: dict[tuple[str, int, int], int] = {}
    for index, device in enumerate(config.devices):
        modbus = device.modbus
        if modbus is None or modbus.host is None:  # a unit on a [[links]] entry: checked there
            continue
        for address in sorted(cache[modbus.host]):
            first = owners.setdefault((address, modbus.port, modbus.unit), index)
            if first != index:
                other = config.devices[first]
                assert other.modbus is not None
                found.append(
                    f"devices[{index}].modbus: {modbus.host}:{modbus.port} unit {modbus.unit} is "
                    f"{other.modbus.host}:{other.modbus.port} unit {other.modbus.unit}, already "
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
