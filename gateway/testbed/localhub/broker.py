"""mosquitto behind a TLS front, as a stand-in for IoT Hub's MQTT endpoint.

The front (:mod:`gateway.testbed.localhub.front`) holds the public port: TLS 1.2 or newer with
AEAD ciphers only, a client certificate required from everyone, the certificate's CN as the
identity; it scopes ``$iothub/...`` per identity and closes a connection that publishes or
subscribes outside its identity's topics, as IoT Hub does. mosquitto listens only on a unix
socket in the stand-in's private folder, with ACLs that mirror IoT Hub's topics in their inner
per-device form. It binds loopback unless told otherwise. Facts: shared/recipes/localhub.md.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import tempfile
from pathlib import Path
from typing import IO

from gateway.core.errors import FieldgateError
from gateway.core.tlsprofile import TLS12_CIPHERS
from gateway.identity.pki import Pki, decrypted_key_pem
from gateway.runtime import child_process_options
from gateway.testbed.localhub.front import (
    Front,
    SasCheck,
    Violation,
    inner_acl,
    server_context,
)

# The uplink's own list: the stand-in takes exactly what a gateway offers on TLS 1.2.
CIPHERS = TLS12_CIPHERS

# IoT Hub's device topics, with mosquitto's %u (the CN, set as username by the front).
ACL = inner_acl()
INNER_SOCKET = "inner.sock"


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


def render_config(workdir: Path, run_as: str | None, persist: Path | None = None) -> str:
    # Every listener-scoped option comes after the `listener` line: otherwise mosquitto 2.0
    # silently opens an extra listener on all interfaces. The one listener is a unix socket in
    # the private folder: only the front reaches it, and it sets the username to the CN it
    # verified, so anonymous access there is the front's identity.
    lines = [
        "per_listener_settings true",
        # With persist, the hub-service session and the messages queued for it survive a
        # restart of the stand-in, as they do in IoT Hub.
        *(
            ["persistence true", f"persistence_location {persist}/"]
            if persist
            else ["persistence false"]
        ),
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
        f"listener 0 {workdir / INNER_SOCKET}",
        "allow_anonymous true",
        f"acl_file {workdir / 'acl'}",
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
        sas: SasCheck | None = None,
    ) -> None:
        # sas: module identities with SAS tokens are let in too (the edgeHub stand-in).
        self.sas = sas
        self.persist = persist
        self.pki = pki
        self.port = port
        self.host = host
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None
        self.front: Front | None = None
        self._front_log: IO[str] | None = None
        self._dir: Path | None = None

    async def __aenter__(self) -> Broker:
        binary = mosquitto_binary()
        workdir = self._dir = _secret_dir()
        key_pem = decrypted_key_pem(self.pki.server_key, self.pki.passphrase())
        (workdir / "acl").write_text(ACL)
        # The broker persists into its own folder (its user may not reach ours); the file is
        # carried over from and back to the persist folder around each run.
        if self.persist is not None and (self.persist / PERSIST_FILE).exists():
            shutil.copyfile(self.persist / PERSIST_FILE, workdir / PERSIST_FILE)
        run_as = None
        if os.geteuid() == 0:
            # mosquitto started as root drops to its own user before it binds its socket.
            try:
                entry = pwd.getpwnam("mosquitto")
            except KeyError:
                run_as = "root"
            else:
                for path in (workdir, *workdir.iterdir()):
                    os.chown(path, entry.pw_uid, entry.pw_gid)
        conf = workdir / "mosquitto.conf"
        conf.write_text(render_config(workdir, run_as, workdir if self.persist else None))
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
            self._front_log = open(self.log_path, "a") if self.log_path else None
            self.front = Front(
                server_context(
                    self.pki.root_cert,
                    self.pki.server_cert,
                    key_pem,
                    workdir,
                    certificate_optional=self.sas is not None,
                ),
                host=self.host,
                port=self.port,
                inner=workdir / INNER_SOCKET,
                log_file=self._front_log,
                sas=self.sas,
            )
            try:
                await self.front.start()
            except OSError as err:
                raise BrokerError(
                    f"the stand-in cannot listen on {self.host}:{self.port}: "
                    f"{err.strerror or err} (is the port free?)"
                ) from err
        except BaseException:
            await self.__aexit__()
            raise
        return self

    @property
    def violations(self) -> list[Violation]:
        """What the front refused (connections closed), oldest first."""
        return self.front.violations if self.front is not None else []

    async def _wait_listening(self) -> None:
        assert self.process is not None and self._dir is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while loop.time() < deadline:
            if self.process.returncode is not None:
                raise BrokerError(
                    f"mosquitto exited with code {self.process.returncode} "
                    f"(see {self.log_path or 'its log'})"
                )
            try:
                _, writer = await asyncio.open_unix_connection(str(self._dir / INNER_SOCKET))
            except OSError:
                # Startup of an external process: no event to wait on, so poll briefly.
                await asyncio.sleep(0.02)
                continue
            writer.close()
            return
        raise BrokerError(f"mosquitto did not listen on {self._dir / INNER_SOCKET} within 10 s")

    async def __aexit__(self, *exc: object) -> None:
        # Idempotent: the load test stops its hub early, then leaves the block.
        if self.front is not None:
            await self.front.stop()
        if self._front_log is not None:
            self._front_log.close()
            self._front_log = None
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
