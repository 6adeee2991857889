"""Profile (d): the baseline a user would write by hand, on the same devices and stand-in.

One azure-iot-device ``IoTHubDeviceClient`` per device (X.509, the device's own identity),
a pymodbus poll per device at the same rate, and one telemetry message per reading (JSON with
the point, value, read time and a sequence number). The hub side counts messages, latency and
sequence gaps the same way fieldgate's loadtest does.

The SDK's MQTT port is fixed at 8883, so the stand-in listens on 127.0.0.1:8883: that port
must be free. Needs ``pip install 'azure-iot-device>=2.14,<3'`` (it pins paho-mqtt < 2).

    python benchmarks/baseline.py --devices 20 --points 10 --rate 1 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

SDK_PORT = 8883


async def publish(config_path: Path, duration: float) -> None:
    """The hand-written publisher: runs in its own process so its CPU can be measured."""
    from azure.iot.device import X509, Message
    from azure.iot.device.aio import IoTHubDeviceClient
    from pymodbus.client import AsyncModbusTcpClient

    from adapters.modbus.registers import plan_reads
    from gateway import config as config_mod

    cfg = config_mod.load(config_path)
    passphrase = cfg.secrets.passphrase().decode()
    root = Path(cfg.hub.ca_file).read_text()

    async def device(dev: Any) -> None:
        client = IoTHubDeviceClient.create_from_x509_certificate(
            x509=X509(str(dev.cert), str(dev.key), pass_phrase=passphrase),
            hostname=cfg.hub.hostname,
            device_id=dev.id,
            gateway_hostname="localhost",
            server_verification_cert=root,
        )
        await client.connect()
        modbus = AsyncModbusTcpClient(dev.modbus.host, port=dev.modbus.port)
        await modbus.connect()
        blocks = plan_reads(dev.points)
        seq = 0
        period = dev.points[0].period
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        end = next_at + duration
        while loop.time() < end:
            for block in blocks:
                ts_ms = int(time.time() * 1000)
                reader = {
                    "holding": modbus.read_holding_registers,
                    "input": modbus.read_input_registers,
                    "coil": modbus.read_coils,
                    "discrete": modbus.read_discrete_inputs,
                }[block.table]
                response = await reader(block.address, count=block.count, device_id=dev.modbus.unit)
                values = block.decode(response.bits if block.bits else response.registers)
                for name, value in zip(block.names, values, strict=True):
                    message = Message(
                        json.dumps({"point": name, "value": value, "ts_ms": ts_ms, "seq": seq})
                    )
                    message.content_type = "application/json"
                    message.content_encoding = "utf-8"
                    await client.send_message(message)
                    seq += 1
            next_at += period
            await asyncio.sleep(max(0.0, next_at - loop.time()))
        modbus.close()
        await client.shutdown()

    await asyncio.gather(*(device(d) for d in cfg.devices))


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    from gateway.identity import pki as pki_mod
    from gateway.identity.pki import SERVICE_IDENTITY
    from gateway.identity.tls import client_context
    from gateway.testbed.harness import fieldgate, modbus_load_argv
    from gateway.testbed.loadtest.procstat import usage
    from gateway.testbed.localhub.broker import Broker
    from gateway.uplink.mqtt import MqttClient

    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", SDK_PORT))
        except OSError as err:
            raise SystemExit(
                f"127.0.0.1:{SDK_PORT} is taken; the SDK can use no other port"
            ) from err
    work = Path(tempfile.mkdtemp(prefix="fieldgate-baseline-"))
    pki = pki_mod.init(work / "pki")
    config = work / "gateway.toml"
    per_second: dict[int, int] = defaultdict(int)
    latencies: list[float] = []
    seqs: dict[str, set[int]] = defaultdict(set)
    started = time.time()

    def on_message(topic: str, body: bytes) -> None:
        now = time.time()
        doc = json.loads(body)
        device = topic.split("/")[1]
        if doc["seq"] in seqs[device]:
            return
        seqs[device].add(doc["seq"])
        per_second[int(now - started)] += 1
        latencies.append(now * 1000 - doc["ts_ms"])

    async with Broker(pki, port=SDK_PORT, log_path=work / "broker.log"):
        context = client_context(pki.root_cert, pki.service_cert, pki.service_key, pki.passphrase())
        async with MqttClient(
            host="127.0.0.1",
            port=SDK_PORT,
            client_id=SERVICE_IDENTITY,
            ssl_context=context,
            server_hostname="localhost",
            on_message=on_message,
        ) as service:
            await service.subscribe([("devices/+/messages/events/#", 1)])
            sim = await asyncio.create_subprocess_exec(
                *fieldgate(
                    *modbus_load_argv(
                        devices=args.devices,
                        config=config,
                        pki=work / "pki",
                        hub_port=SDK_PORT,
                        state_dir=work / "state",
                        points=args.points,
                        types=args.types,
                        rate=args.rate,
                    )
                ),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            while not config.exists():  # noqa: ASYNC110 - another process writes it
                await asyncio.sleep(0.1)
            await asyncio.sleep(2)
            publisher = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "publish",
                str(config),
                str(args.warmup + args.duration),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=open(work / "publisher.log", "wb"),
            )
            await asyncio.sleep(args.warmup)
            t0, (cpu0, _, _) = time.time(), usage(publisher.pid)
            await asyncio.sleep(args.duration)
            t1, (cpu1, _, rss) = time.time(), usage(publisher.pid)
            await publisher.wait()
            sim.terminate()
            await sim.wait()
    window = sum(n for s, n in per_second.items() if t0 - started <= s < t1 - started)
    points_per_s = window / (t1 - t0)
    cpu = cpu1 - cpu0
    ordered = sorted(latencies)
    gaps = sum(max(s) + 1 - len(s) for s in seqs.values() if s)
    return {
        "profile": {
            "devices": args.devices,
            "points": args.points,
            "rate_hz": args.rate,
            "offered_points_per_s": args.devices * args.points * args.rate,
        },
        "client": "azure-iot-device, one IoTHubDeviceClient per device, one message per reading",
        "points_per_s": round(points_per_s),
        "cpu_s_per_1M_points": round(cpu / (points_per_s * (t1 - t0)) * 1e6, 1)
        if points_per_s
        else None,
        "cpu_cores": round(cpu / (t1 - t0), 3),
        "peak_rss_mb": round(rss, 1),
        "latency_ms": {
            "p50": round(ordered[len(ordered) // 2], 1),
            "p99": round(ordered[int(len(ordered) * 0.99)], 1),
        }
        if ordered
        else None,
        "messages_per_1k_points": 1000.0,
        "sequence_gaps": gaps,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "publish":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        asyncio.run(publish(Path(sys.argv[2]), float(sys.argv[3])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--points", type=int, default=10)
    parser.add_argument("--rate", type=float, default=1.0)
    parser.add_argument("--types", default="float32")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=8.0)
    print(json.dumps(asyncio.run(measure(parser.parse_args())), indent=2))


if __name__ == "__main__":
    main()
