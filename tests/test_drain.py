"""After an outage, a backlog drains oldest first and does not starve a device without one."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from gateway.config import HubConfig
from gateway.core.readings import CODEC, Envelope, Header
from gateway.identity.pki import Pki
from gateway.identity.tls import client_context
from gateway.store import Store
from gateway.testbed.localhub.broker import Broker
from gateway.testbed.ports import free_ports
from gateway.uplink.session import DeviceSession
from gateway.uplink.throttle import RateLimiter


def _envelopes(device: str, count: int) -> list[Envelope]:
    return [
        Envelope(device, Header(1, "k1", "b", i * 10, 10, CODEC), os.urandom(300), 0)
        for i in range(count)
    ]


def test_a_backlog_drains_in_order_at_the_send_rate_and_a_live_device_is_not_starved(
    pki_dir: Path, tmp_path: Path
) -> None:
    pki = Pki(pki_dir)
    port = free_ports(1)
    hub = HubConfig.model_validate(
        {
            "hostname": "localhost",
            "address": "127.0.0.1",
            "port": port,
            "ca_file": str(pki.root_cert),
        }
    )

    async def scenario() -> tuple[list[int], int, float]:
        async with Broker(pki, port=port), Store(tmp_path / "s.db", max_bytes=10**8) as store:
            await store.put(_envelopes("plc-1", 150))  # the backlog of an outage
            connects, sends = RateLimiter(100), RateLimiter(60)
            sessions = {
                d: DeviceSession(
                    d,
                    hub,
                    client_context(
                        pki.root_cert, pki.device_cert(d), pki.device_key(d), pki.passphrase()
                    ),
                    store,
                    connects,
                    sends,
                )
                for d in ("plc-1", "plc-2")
            }
            order: list[int] = []
            acked = {"plc-1": 0, "plc-2": 0}
            changed = asyncio.Event()
            original = store.ack

            def ack(device: str, lease_id: int) -> None:
                if device == "plc-1":
                    order.append(lease_id)
                original(device, lease_id)
                acked[device] += 1
                changed.set()

            async def until(device: str, count: int) -> None:
                while acked[device] < count:
                    changed.clear()
                    await changed.wait()

            store.ack = ack  # type: ignore[method-assign]
            loop = asyncio.get_running_loop()
            started = loop.time()
            async with asyncio.TaskGroup() as tg:
                for session in sessions.values():
                    tg.create_task(session.run())
                await until("plc-1", 18)  # the drain is under way (0.3 s at 60/s)
                await store.put(_envelopes("plc-2", 10))  # live data of another device
                await until("plc-2", 10)
                backlog_done_when_live_done = sessions["plc-1"].stats.envelopes_acked
                await until("plc-1", 150)
                elapsed = loop.time() - started
                store.close()
            return order, backlog_done_when_live_done, elapsed

    order, backlog_at_live_done, elapsed = asyncio.run(scenario())
    assert order == sorted(order) and len(order) == 150  # oldest first
    # 160 messages at 60/s take about 2.7 s: the send rate paced the drain.
    assert elapsed >= 160 / 60 * 0.9
    # The live device's 10 messages went out among the backlog, not after all of it.
    assert backlog_at_live_done < 120
