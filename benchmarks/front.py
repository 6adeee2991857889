"""What the stand-in's TLS front costs per telemetry message (every test's telemetry passes it).

A child process holds the stand-in (front + mosquitto); this process runs ``--devices`` device
connections publishing QoS 1 telemetry of ``--size`` bytes, at most ``--window`` in flight each,
and one service subscriber. The front's CPU is the child's own CPU time (mosquitto, its child,
is counted apart), read from /proc before and after the run. Prints JSON.

    python benchmarks/front.py --devices 10 --messages 2000 --size 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def serve(pki_dir: Path, port: int) -> None:
    from gateway.identity.pki import Pki
    from gateway.testbed.localhub.broker import Broker

    async with Broker(Pki(pki_dir), port=port) as broker:
        assert broker.process is not None
        print(f"ready {broker.process.pid}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    from gateway.core.iothub import iothub_username
    from gateway.identity import pki as pki_mod
    from gateway.identity.pki import SERVICE_IDENTITY
    from gateway.identity.tls import client_context
    from gateway.testbed.ports import free_ports
    from gateway.uplink.mqtt import MqttClient

    work = Path(tempfile.mkdtemp(prefix="fieldgate-front-bench-"))
    devices = [f"bench-{i}" for i in range(args.devices)]
    pki = pki_mod.init(work / "pki")
    pki_mod.issue(work / "pki", devices)
    port = free_ports(1)
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--serve",
        str(work / "pki"),
        str(port),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None and child.stdin is not None
    line = (await child.stdout.readline()).decode().split()
    mosquitto = int(line[1])
    received = 0
    done = asyncio.Event()
    total = args.devices * args.messages

    def on_message(topic: str, body: bytes) -> None:
        nonlocal received
        received += 1
        if received >= total:
            done.set()

    pp = pki.passphrase()
    service = MqttClient(
        host="127.0.0.1",
        port=port,
        client_id=SERVICE_IDENTITY,
        ssl_context=client_context(pki.root_cert, pki.service_cert, pki.service_key, pp),
        server_hostname="localhost",
        on_message=on_message,
    )
    clients = [
        MqttClient(
            host="127.0.0.1",
            port=port,
            client_id=d,
            ssl_context=client_context(pki.root_cert, pki.device_cert(d), pki.device_key(d), pp),
            server_hostname="localhost",
            username=iothub_username("localhost", d),
        )
        for d in devices
    ]
    body = os.urandom(args.size)
    try:
        await service.__aenter__()
        await service.subscribe([("devices/+/messages/events/#", 1)])
        for c in clients:
            await c.__aenter__()
        front0, mosq0, t0 = _cpu(child.pid), _cpu(mosquitto), time.perf_counter()

        async def send(client: MqttClient) -> None:
            window: list[asyncio.Future[None]] = []
            topic = f"devices/{client.client_id}/messages/events/%24.ct=application%2Fjson"
            for _ in range(args.messages):
                sent = client.publish(topic, body)
                assert sent is not None
                window.append(sent)
                if len(window) >= args.window:
                    await asyncio.gather(*window)
                    window.clear()
            await asyncio.gather(*window)

        await asyncio.gather(*(send(c) for c in clients))
        await asyncio.wait_for(done.wait(), 60)
        wall = time.perf_counter() - t0
        front = _cpu(child.pid) - front0
        mosq = _cpu(mosquitto) - mosq0
    finally:
        for c in clients:
            await c.disconnect()
        await service.disconnect()
        child.stdin.close()
        await child.wait()
    return {
        "devices": args.devices,
        "messages": total,
        "size": args.size,
        "wall_s": round(wall, 3),
        "messages_per_s": round(total / wall),
        # Each message crosses the front twice: in from the device, out to the service.
        "front_cpu_us_per_message": round(front / total * 1e6, 1),
        "mosquitto_cpu_us_per_message": round(mosq / total * 1e6, 1),
    }


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        asyncio.run(serve(Path(sys.argv[2]), int(sys.argv[3])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--messages", type=int, default=2000, help="per device")
    parser.add_argument("--size", type=int, default=1000, help="bytes per message body")
    parser.add_argument("--window", type=int, default=50, help="QoS 1 in flight per device")
    print(json.dumps(asyncio.run(measure(parser.parse_args())), indent=2))


if __name__ == "__main__":
    main()
