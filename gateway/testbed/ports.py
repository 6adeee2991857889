"""Free loopback ports for the tools that start local services (demo, tests, benchmarks)."""

from __future__ import annotations

import random
import socket


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(count: int = 1, host: str = "127.0.0.1") -> int:
    """The first of ``count`` consecutive ports that are free right now on ``host``.

    They are chosen below the kernel's ephemeral range: a port in that range can be taken
    meanwhile by any outgoing connection (even one to the port itself, a TCP self-connect),
    and a hub or device restarted on it would then fail to listen.
    """
    top = _ephemeral_start() - 1
    for _ in range(200):
        base = random.randint(10000, top - count)
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)  # closed below even when its bind fails
                sock.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports on {host}")
