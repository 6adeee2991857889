"""mosquitto configured as a stand-in for IoT Hub's MQTT endpoint.

TLS 1.2 or newer with AEAD ciphers only, a client certificate required from everyone, the
certificate's CN used as the identity (username and client id), and per-identity ACLs that
mirror IoT Hub's topics: a device may publish only on its own ``devices/{id}/...`` topics.
It binds loopback unless told otherwise. Facts behind each line: shared/recipes/localhub.md.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import tempfile
from pathlib import Path

from gateway.core import iothub
from gateway.core.errors import FieldgateError
from gateway.core.tlsprofile import TLS12_CIPHERS
from gateway.identity.pki import MONITOR_IDENTITY, SERVICE_IDENTITY, Pki, decrypted_key_pem
from gateway.runtime import child_process_options

# The uplink's own list: the stand-in takes exactly what a gateway offers on TLS 1.2.
CIPHERS = TLS12_CIPHERS

ACL = (
    "\n".join(
        [
            f"user {SERVICE_IDENTITY}",
            "topic readwrite #",
            "topic readwrite $iothub/#",  # `#` does not match $-topics
            f"user {MONITOR_IDENTITY}",
            f"topic read {iothub.ALL_TELEMETRY}",
            # IoT Hub's device topics, with mosquitto's %u (the certificate's CN) for the device.
            *(f"pattern write {t.format(device='%u')}" for t in iothub.DEVICE_PUBLISHES),
            *(f"pattern read {t.format(device='%u')}" for t in iothub.DEVICE_RECEIVES),
        ]
    )
    + "\n"
)


PERSIST_FILE = "mosquitto.db"


class BrokerError(FieldgateError):
    pass


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
    )
    if found is None:
        raise BrokerError("mosquitto is not installed (Debian: apt-get install -y mosquitto)")
    return found


def render_config(
    workdir: Path, host: str, port: int, run_as: str | None, persist: Path | None = None
) -> str:
    # Every listener-scoped option comes after the `listener` line: otherwise mosquitto 2.0
    # silently opens an extra listener on all interfaces.
    lines = [
        "per_listener_settings false",
        "allow_anonymous false",
        # With persist, the hub-service session and the messages queued for it survive a
        # restart of the stand-in, as they do in IoT Hub.
        *(
            ["persistence true", f"persistence_location {persist}/"]
            if persist
            else ["persistence false"]
        ),
        f"acl_file {workdir / 'acl'}",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "connection_messages true",
        "max_inflight_messages 1000",
        "max_queued_messages 100000",
    ]
    if run_as:
        lines.append(f"user {run_as}")
    lines += [
        f"listener {port} {host}",
        f"cafile {workdir / 'root.pem'}",
        f"certfile {workdir / 'server.pem'}",
        f"keyfile {workdir / 'server.key'}",
        "tls_version tlsv1.2",
        f"ciphers {CIPHERS}",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
    ]
    return "\n".join(lines) + "\n"


def _secret_dir() -> Path:
    # The broker cannot take a passphrase, so its key is decrypted into memory-backed storage
    # and removed on exit.
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="fieldgate-hub-", dir=base))


class Broker:
    """An async context manager: the broker runs inside the block, is stopped by PID after."""

    def __init__(
        self,
        pki: Pki,
        *,
        port: int,
        host: str = "127.0.0.1",
        log_path: Path | None = None,
        persist: Path | None = None,
    ) -> None:
        self.persist = persist
        self.pki = pki
        self.port = port
        self.host = host
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None
        self._dir: Path | None = None

    async def __aenter__(self) -> Broker:
        binary = mosquitto_binary()
        workdir = self._dir = _secret_dir()
        key = workdir / "server.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(decrypted_key_pem(self.pki.server_key, self.pki.passphrase()))
        (workdir / "acl").write_text(ACL)
        # Copies, so that the broker's user needs no access to the PKI folder itself.
        shutil.copyfile(self.pki.root_cert, workdir / "root.pem")
        shutil.copyfile(self.pki.server_cert, workdir / "server.pem")
        # The broker persists into its own folder (its user may not reach ours); the file is
        # carried over from and back to the persist folder around each run.
        if self.persist is not None and (self.persist / PERSIST_FILE).exists():
            shutil.copyfile(self.persist / PERSIST_FILE, workdir / PERSIST_FILE)
        run_as = None
        if os.geteuid() == 0:
            # mosquitto started as root drops to its own user before reading the key.
            try:
                entry = pwd.getpwnam("mosquitto")
            except KeyError:
                run_as = "root"
            else:
                for path in (workdir, *workdir.iterdir()):
                    os.chown(path, entry.pw_uid, entry.pw_gid)
        conf = workdir / "mosquitto.conf"
        conf.write_text(
            render_config(workdir, self.host, self.port, run_as, workdir if self.persist else None)
        )
        log = open(self.log_path, "ab") if self.log_path else asyncio.subprocess.DEVNULL
        try:
            self.process = await asyncio.create_subprocess_exec(
                binary,
                "-c",
                str(conf),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                **child_process_options(),
            )
        finally:
            if not isinstance(log, int):
                log.close()
        try:
            await self._wait_listening()
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def _wait_listening(self) -> None:
        assert self.process is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while loop.time() < deadline:
            if self.process.returncode is not None:
                raise BrokerError(
                    f"mosquitto exited with code {self.process.returncode} "
                    f"(see {self.log_path or 'its log'}; is port {self.port} free?)"
                )
            try:
                _, writer = await asyncio.open_connection(self.host, self.port)
            except OSError:
                # Startup of an external process: no event to wait on, so poll briefly.
                await asyncio.sleep(0.02)
                continue
            writer.close()
            return
        raise BrokerError(f"mosquitto did not listen on {self.host}:{self.port} within 10 s")

    async def __aexit__(self, *exc: object) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            try:
                async with asyncio.timeout(5):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._dir is not None:
            if self.persist is not None and (self._dir / PERSIST_FILE).exists():
                self.persist.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self._dir / PERSIST_FILE, self.persist / PERSIST_FILE)
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
