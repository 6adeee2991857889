"""`fieldgate loadtest`: start a simulated fleet, the hub stand-in and the gateway; ramp, hold,
stop; measure at the hub side; write a report (JSON, a terminal table, PNG plots).

The gateway runs as its own process (or W worker processes); its CPU and memory are read from
/proc for the whole process tree. Readings carry the gateway's read timestamp, so latency is
read -> opened at the hub. Loss is counted against what the gateway's stores accepted: after
the stop, every accepted sequence number must reach the hub, or the run fails and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adapters.ble.gatt import MEASUREMENT_FORMAT, STATUS_FORMAT, struct_fields
from gateway import config as config_mod
from gateway import runtime
from gateway.core.errors import FieldgateError
from gateway.identity import pki as pki_mod
from gateway.identity.pki import MONITOR_IDENTITY
from gateway.store import accepted as store_accepted
from gateway.store.paths import run_stores
from gateway.testbed import harness
from gateway.testbed.console import Column, Console, Live, Renderable, table
from gateway.testbed.harness import free_ports, machine
from gateway.testbed.loadtest.procstat import usage
from gateway.testbed.loadtest.report import write_plots, write_report
from gateway.testbed.loadtest.stats import Collector, phase_label, summarize, timeline
from gateway.testbed.localhub.broker import Broker
from gateway.testbed.localhub.service import HubService

# A simulated peripheral's notification (counter, temperature, humidity, battery) and its
# polled status characteristic, in points.
BLE_POINTS = struct_fields(MEASUREMENT_FORMAT)
BLE_STATUS_POINTS = struct_fields(STATUS_FORMAT)
BLE_POLL_PERIOD = 10.0
# Seconds a child has to stop after SIGTERM, and a simulator to say it is ready.
STOP_GRACE = 30.0
READY_WITHIN = 60.0


@dataclass
class Plan:
    modbus: int = 10
    ble: int = 0
    ble_signals: bool = False
    points: int = 10
    rate: float = 1.0
    duration: float = 30.0
    ramp: float = 5.0
    workers: int = 1
    types: str = "float32"
    max_age: float = 1.0
    out: Path = Path("loadtest-out")
    gateway_config: Path | None = None
    hub: str | None = None
    pki: Path | None = None
    stop_hub_after: float | None = None
    drain_timeout: float = 20.0
    live: bool = True


def _offered(cfg: config_mod.Config, plan: Plan) -> float:
    """Points per second the devices offer. Notifications come at the devices' own rate, which
    a config does not say: they count only for the simulated peripherals (``plan.ble``)."""
    modbus = sum(1.0 / p.period for d in cfg.devices if d.enabled for p in d.points)
    polled = sum(
        len(row.values) / row.period
        for d in cfg.devices
        if d.enabled and d.ble is not None
        for row in d.ble.characteristics
        if row.mode == "poll"
    )
    notified = plan.ble * BLE_POINTS * plan.rate if plan.gateway_config is None else 0.0
    return modbus + polled + notified


def _live_table(
    phase: str, offered: float, collector: Collector, sample: dict[str, Any]
) -> Renderable:
    now = time.time()
    columns = [
        Column(header, justify="right")
        for header in (
            "offered pts/s",
            "delivered pts/s",
            "backlog",
            "p50 ms",
            "p99 ms",
            "gateway CPU",
            "gateway RSS",
        )
    ]
    p50, p99 = collector.recent_latency(now, 0.5), collector.recent_latency(now, 0.99)
    row = (
        f"{offered:,.0f}",
        f"{collector.rate(now):,.0f}",
        f"{sample.get('backlog', 0):,}",
        "-" if p50 is None else f"{p50:.0f}",
        "-" if p99 is None else f"{p99:.0f}",
        f"{sample.get('cores', 0):.2f} cores",
        f"{sample.get('rss', 0):.0f} MB",
    )
    return table(f"fieldgate loadtest: {phase}", columns, [row])


@dataclass
class _Rig:
    """What the set-up started: the hub (the stand-in's broker, or where a user's config
    points), the children (simulators, later the gateway), and the config under test."""

    out: Path
    pki_dir: Path
    pki: pki_mod.Pki
    stack: contextlib.AsyncExitStack
    host: str
    port: int
    broker: Broker | None = None
    children: list[asyncio.subprocess.Process] = field(default_factory=list)
    config_path: Path = Path()
    ble_bus: str | None = None

    async def start(self, name: str, *args: str) -> asyncio.subprocess.Process:
        """``fieldgate ARGS`` as a child, its output in ``OUT/NAME.log``; stopped (in the
        reverse order of their start) when the rig's stack closes."""
        log = open(self.out / f"{name}.log", "wb")
        self.stack.callback(log.close)
        proc = await harness.spawn(args, log)
        self.children.append(proc)
        return proc


@dataclass
class _Hold:
    """What the ramp and the hold measured."""

    hold_from: float
    hold_to: float
    cpu_hold_s: float
    high_water: float
    hub_stopped: bool


@dataclass
class _Drained:
    """The gateway's exit, what its stores accepted, and what the peripherals counted."""

    gateway_code: int
    promised: dict[str, int]
    peripherals: dict[str, Any] | None


async def loadtest(plan: Plan, stop: asyncio.Event) -> int:
    """Set up, ramp and hold while measuring, stop and drain, report."""
    console = Console()
    async with contextlib.AsyncExitStack() as stack:
        rig = await _set_up(plan, stack)
        cfg = config_mod.load(rig.config_path)
        offered = _offered(cfg, plan)
        stores = run_stores(cfg, plan.workers)

        collector = Collector(started=time.time())
        # Its own identity: a `fieldgate localhub` may already consume as hub-service.
        service = HubService(
            rig.pki,
            host=rig.host,
            port=rig.port,
            on_opened=collector.opened,
            identity=MONITOR_IDENTITY,
        )
        stack.callback(service.close)
        service_stop = asyncio.Event()
        service_task = asyncio.create_task(service.run(service_stop), name="hub-service")
        await asyncio.wait_for(service.connected.wait(), 20)

        gateway = await rig.start(
            "gateway",
            "--log-level",
            "warning",
            "run",
            "--config",
            str(rig.config_path),
            "--workers",
            str(plan.workers),
        )
        with console.live() if plan.live else contextlib.nullcontext() as view:
            hold = await _ramp_and_hold(plan, rig, gateway, collector, stores, offered, view, stop)
            drained = await _stop_and_drain(plan, rig, gateway, collector, stores, hold)
        service_stop.set()
        await service_task
    return _report(plan, collector, hold, drained, offered, console)


async def _set_up(plan: Plan, stack: contextlib.AsyncExitStack) -> _Rig:
    """The PKI, the hub (a new stand-in, an existing one, or the user config's), and the
    simulated devices with the config they write (unless the plan brings its own config)."""
    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    if plan.gateway_config is not None and plan.pki is None:
        raise FieldgateError(
            "--gateway-config needs --pki: the PKI whose hub-service identity "
            "and keyring read what the gateway sends"
        )
    pki_dir = plan.pki or out / "pki"
    if not (pki_dir / "root.pem").exists():
        pki_mod.init(pki_dir)
    pki = pki_mod.Pki(pki_dir)
    broker = None
    if plan.hub:
        host, _, port_text = plan.hub.rpartition(":")
        port = int(port_text)
    elif plan.gateway_config is not None:
        # A user's config names its hub: measure there (a `fieldgate localhub` the user
        # runs with the same PKI), not at a stand-in the gateway would never reach.
        user_hub = config_mod.load(plan.gateway_config).hub
        host, port = user_hub.address or user_hub.hostname, user_hub.port
    else:
        host, port = "127.0.0.1", free_ports(1)
        broker = Broker(pki, port=port, log_path=out / "broker.log")
        await stack.enter_async_context(broker)
    rig = _Rig(out=out, pki_dir=pki_dir, pki=pki, stack=stack, host=host, port=port, broker=broker)
    stack.push_async_callback(harness.stop_all, rig.children, STOP_GRACE)
    if plan.gateway_config is not None:
        rig.config_path = plan.gateway_config
        return rig
    rig.config_path = out / "gateway.toml"
    rig.config_path.unlink(missing_ok=True)
    if plan.modbus:
        sim = await rig.start(
            "simulator",
            *harness.modbus_load_argv(
                devices=plan.modbus,
                config=rig.config_path,
                pki=pki_dir,
                hub_port=port,
                state_dir=out / "state",
                points=plan.points,
                types=plan.types,
                rate=plan.rate,
                max_age=plan.max_age,
            ),
        )
        await harness.wait_for_file(
            out / "simulator.log", sim, READY_WITHIN, text=harness.MODBUS_READY
        )
    if plan.ble:
        rig.ble_bus = await _start_ble(plan, rig)
    return rig


async def _ramp_and_hold(
    plan: Plan,
    rig: _Rig,
    gateway: asyncio.subprocess.Process,
    collector: Collector,
    stores: list[Path],
    offered: float,
    view: Live | None,
    stop: asyncio.Event,
) -> _Hold:
    """Sample the gateway's CPU, memory and backlog once a second through the ramp and the
    hold (stopping the hub on the way, if the plan says so), until the hold ends, the gateway
    exits or ``stop`` is set."""
    t0 = time.time()
    hold_from, hold_to = t0 + plan.ramp, t0 + plan.ramp + plan.duration
    cpu_at: dict[str, float] = {}
    sample: dict[str, Any] = {}
    high_water = 0.0
    hub_stopped = False
    while not stop.is_set():
        now = time.time()
        if now >= hold_to or gateway.returncode is not None:
            break
        phase = "ramp" if now < hold_from else "hold"
        cpu, rss, high_water = usage(gateway.pid)
        if phase == "hold" and "start" not in cpu_at:
            cpu_at["start"] = cpu
        backlog = max(
            0,
            sum(sum(store_accepted(p).values()) for p in stores)
            - collector.tracker.unique_readings(),
        )
        previous = sample.get("cpu", cpu)
        sample = {"cpu": cpu, "cores": cpu - previous, "rss": rss, "backlog": backlog}
        collector.sample(now, cpu, rss, backlog)
        if (
            plan.stop_hub_after is not None
            and not hub_stopped
            and rig.broker is not None
            and now - t0 >= plan.stop_hub_after
        ):
            await rig.broker.__aexit__(None, None, None)  # the hub goes away for good
            hub_stopped = True
        if view is not None:
            label = phase_label(now, t0, plan.ramp, plan.duration)
            view.update(_live_table(label, offered, collector, sample))
        with contextlib.suppress(TimeoutError):
            # Wake at the hold's end, not up to a second after it: polling stops there.
            async with asyncio.timeout(min(1.0, max(0.0, hold_to - time.time()))):
                await stop.wait()
    hold_to = min(hold_to, time.time())
    cpu_end, _, high_water = usage(gateway.pid)
    return _Hold(
        hold_from=hold_from,
        hold_to=hold_to,
        cpu_hold_s=cpu_end - cpu_at.get("start", cpu_end),
        high_water=high_water,
        hub_stopped=hub_stopped,
    )


async def _stop_and_drain(
    plan: Plan,
    rig: _Rig,
    gateway: asyncio.subprocess.Process,
    collector: Collector,
    stores: list[Path],
    hold: _Hold,
) -> _Drained:
    """Ask the peripherals what they sent, stop the gateway (it flushes), then give the hub
    up to ``plan.drain_timeout`` to receive everything the stores accepted."""
    peripherals = await _ble_stats(rig.ble_bus) if rig.ble_bus else None
    gateway_code = await harness.stop(gateway, STOP_GRACE)
    promised = {d: n for p in stores for d, n in store_accepted(p).items()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (0 if hold.hub_stopped else plan.drain_timeout)
    while (  # noqa: ASYNC110 - the counter lives in the hub service's callback
        collector.tracker.unique_readings() < sum(promised.values()) and loop.time() < deadline
    ):
        await asyncio.sleep(0.2)  # the last envelopes on their way to the hub
    return _Drained(gateway_code=gateway_code, promised=promised, peripherals=peripherals)


def _report(
    plan: Plan,
    collector: Collector,
    hold: _Hold,
    drained: _Drained,
    offered: float,
    console: Console,
) -> int:
    """The summary, what failed, the report files and the terminal table; 0 if nothing
    failed."""
    summary = summarize(
        collector,
        hold_from=hold.hold_from,
        hold_to=hold.hold_to,
        accepted=drained.promised,
        cpu_hold_s=hold.cpu_hold_s,
        peak_rss_mb=collector.max_rss_mb,
        rss_high_water_mb=hold.high_water,
        offered_points_per_s=offered,
    )
    problems = []
    if summary["loss"]["accepted_not_delivered"]:
        problems.append(
            f"{summary['loss']['accepted_not_delivered']} accepted readings never "
            "reached the hub (backlog or loss)"
        )
    if summary["loss"]["sequence_gaps"]:
        problems.append(
            f"{summary['loss']['sequence_gaps']} readings missing inside the sequence (gaps)"
        )
    if drained.gateway_code != 0:
        problems.append(f"the gateway exited with {drained.gateway_code}")
    if not summary["points_per_s"]:
        problems.append("nothing was delivered during the hold")
    peripherals = drained.peripherals
    report = {
        "result": "failed" if problems else "ok",
        "problems": problems,
        "plan": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(plan).items()},
        "machine": machine(),
        **summary,
        **({"ble_peripherals": peripherals} if peripherals else {}),
        "timeline": timeline(collector),
    }
    out = plan.out
    write_report(out, report, console)
    plots = write_plots(out, report, collector)
    console.print(
        f"report: {out / 'report.json'}" + (f"; plots: {', '.join(plots)}" if plots else "")
    )
    return 0 if not problems else 1


async def _start_ble(plan: Plan, rig: _Rig) -> str:
    """Simulated peripherals notifying at ``plan.rate``; added to the config the Modbus
    simulator wrote, if any. Returns the simulator's bus address."""
    from adapters.ble.sim.bus import bus_address
    from adapters.ble.sim.run import simulator_argv as ble_argv

    bus_dir = rig.out / "ble-bus"
    sim = await rig.start(
        "ble-simulator",
        *ble_argv(
            devices=plan.ble,
            bus_dir=bus_dir,
            config=rig.config_path,
            pki=rig.pki_dir,
            hub_port=rig.port,
            state_dir=rig.out / "state",
            extra=(
                "--rate",
                str(plan.rate),
                "--poll-period",
                str(BLE_POLL_PERIOD),
                "--max-age",
                str(plan.max_age),
                "--slots",
                str(plan.ble),
                *(("--merge",) if plan.modbus else ()),
                *(("--signals-only",) if plan.ble_signals else ()),
            ),
        ),
    )
    await harness.wait_for_file(
        rig.out / "ble-simulator.log", sim, READY_WITHIN, text=harness.BLE_READY
    )
    return bus_address(bus_dir)


async def _ble_stats(address: str) -> dict[str, Any]:
    """What the simulated peripherals themselves counted: sent, and dropped at the socket."""
    from adapters.ble.sim.control import SimControl

    try:
        async with SimControl(address) as control:
            stats = await control.stats()
    except (OSError, RuntimeError) as err:
        return {"error": repr(err)}
    devices = stats["devices"].values()
    return {
        "connected": stats["connected"],
        "notifications_sent": sum(d["notifications"] for d in devices),
        "notifications_dropped_at_socket": sum(d["dropped"] for d in devices),
        "connect_aborts": stats["adapter"]["aborts"],
    }


def run_loadtest(plan: Plan) -> int:
    async def main(stop: asyncio.Event) -> int:
        return await loadtest(plan, stop)

    return int(runtime.run(main))
