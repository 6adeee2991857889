"""Checks of a validated config against the files it names, run by ``config.load`` when it
checks files (``fieldgate run``): each problem names its field, so a refused start is exit 2
with the field path, and nothing has been written yet.
"""

from __future__ import annotations

from collections.abc import Iterator

from gateway import identity
from gateway.config import Config


def problems(config: Config) -> list[str]:
    """Every problem found, one line each: ``devices[3].cert: ...``."""
    found: list[str] = []
    found += identity.check(_credentials(config), allow_clear_keys=config.secrets.allow_clear_keys)
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
            cert_pem=device.cert.read_bytes(),
            key_path=device.key,
            key_pem=device.key.read_bytes(),
        )
