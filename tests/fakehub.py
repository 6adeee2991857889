"""A minimal TLS + MQTT CONNACK server for what mosquitto cannot be made to do: serve only
TLS 1.1, offer only CBC suites, answer every CONNECT with a refusal, count attempts.

It runs on a thread of the test process with blocking sockets (one connection at a time is
plenty: the gateway under test connects one session per device, and tests use one device).
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
import warnings
from pathlib import Path
from types import TracebackType

from gateway.testbed.ports import free_ports


class FakeHub:
    def __init__(
        self,
        cert: Path,
        key: Path,
        passphrase: bytes,
        *,
        connack: int = 0,
        tls_max: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
        tls_min: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
        ciphers: str | None = None,
        hang_up: bool = False,
        port: int | None = None,
    ) -> None:
        """``hang_up``: read the ClientHello and close without a word, as some servers do
        when they share no TLS version or cipher with the client."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with warnings.catch_warnings():
            # Offering a deprecated version is the point of some of these servers.
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = tls_min
            context.maximum_version = tls_max
        if ciphers is not None:
            context.set_ciphers(ciphers)
        context.load_cert_chain(str(cert), str(key), password=passphrase)
        self._context = context
        self._connack = connack
        self._hang_up = hang_up
        self.port = port or free_ports(1)
        self.attempts = 0  # TCP connections accepted
        self.times: list[float] = []  # when each was accepted (time.monotonic)
        self.handshakes = 0  # TLS handshakes completed
        self.errors: list[str] = []
        self._sock = socket.create_server(("127.0.0.1", self.port))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(10)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            self.attempts += 1
            self.times.append(time.monotonic())
            conn.settimeout(5)
            if self._hang_up:
                try:
                    conn.recv(4096)
                finally:
                    conn.close()
                continue
            try:
                with self._context.wrap_socket(conn, server_side=True) as tls:
                    self.handshakes += 1
                    tls.recv(1024)  # the CONNECT
                    tls.sendall(bytes((0x20, 2, 0, self._connack)))
                    if self._connack:
                        continue
                    while tls.recv(1024):  # hold the session until the client leaves
                        pass
            except (ssl.SSLError, OSError) as err:
                self.errors.append(str(err))
            finally:
                conn.close()
