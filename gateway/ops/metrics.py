"""The Prometheus exposition: ``fieldgate_...`` series made by ``prometheus_client``.

Almost everything is read from state the gateway keeps anyway (device health, session stats,
the store's ledger, the security events' counts) by a custom collector at scrape time: the hot
path pays nothing for metrics, and a scrape costs time only while it runs (on the gateway's own
loop: no thread ever reads loop state). The histograms need observations. The uplink's two
take them per envelope, not per reading: :class:`ObservedQueue` sits between the store and the
uplink sessions (only when ``[metrics]`` is configured) and times each envelope from its lease
to its PUBACK, and from its oldest reading's read to its PUBACK. The Modbus links' one takes
an observation per request, through the ``observe`` a bus is given only when metrics are on
(:meth:`Latency.link`, bound once per bus).

Everything lives on a private :class:`~prometheus_client.CollectorRegistry` (with the process
and platform collectors), never the library's global one: two gateways in one process (tests)
do not see each other's series.
"""

from __future__ import annotations

import gzip
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.core.readings import Envelope
from gateway.store.queue import DeviceDepth, EnvelopeQueue, Leased

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.uplink.session import SessionStats

CONTENT_TYPE = CONTENT_TYPE_LATEST
# The device states of adapters.base, each a series of fieldgate_device_state (1 = current):
# an alert on `fieldgate_device_state{state="down"} == 1` needs the 0s as well.
STATES = ("starting", "up", "down", "quarantined")
# Publish to PUBACK on a loopback hub is about a millisecond; a hub across the world with a
# backlog, seconds. Read to hub adds the batch's age budget (default 1 s) and any outage.
PUBACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
READ_TO_HUB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)
# A Modbus request: a few ms on TCP at the next cabinet, tens of ms on RTU at 9600 baud (a
# frame of 60 registers is 130 ms there), up to the link's timeout (1 s by default) for a unit
# that does not answer.
LINK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# The link label of devices' own connections (a device with its own host): one series for all
# of them, not one per device (16 samples each: 16,000 at 1,000 devices would double the
# scrape). Not a valid [[links]] name (those start with a letter or digit).
OWN_LINKS = "_own"

# (records pending, age in seconds of the oldest one or None): the audit stream's lag.
AuditLag = Callable[[], tuple[int, float | None]]


class Latency:
    """The histograms that need observations."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.puback = Histogram(
            "fieldgate_uplink_publish_ack_seconds",
            "Seconds from an envelope's lease by its session (just before the publish, send "
            "throttle included) to the hub's PUBACK",
            buckets=PUBACK_BUCKETS,
            registry=registry,
        )
        self.read_to_hub = Histogram(
            "fieldgate_read_to_hub_seconds",
            "Seconds from the read of an envelope's oldest reading to the hub's PUBACK for it",
            buckets=READ_TO_HUB_BUCKETS,
            registry=registry,
        )
        self.link_request = Histogram(
            "fieldgate_link_request_seconds",
            "Seconds a Modbus request spent on the wire, to its answer (or the whole wait of "
            "one that timed out), per [[links]] entry; devices' own connections together as "
            f'link="{OWN_LINKS}"',
            ["link"],
            buckets=LINK_BUCKETS,
            registry=registry,
        )

    def link(self, name: str, configured: bool) -> Callable[[float], None]:
        """The observe of ``name``'s series (bound once per bus: one call per request)."""
        return self.link_request.labels(name if configured else OWN_LINKS).observe


class ObservedQueue:
    """The store as the uplink sessions see it, timing each envelope from lease to ack.

    Delegates every call; remembers (lease time, oldest read) per lease id until the ack or
    release. Per envelope, not per reading: at 4 KB envelopes this is one dict entry per
    some hundred readings."""

    def __init__(self, queue: EnvelopeQueue, latency: Latency) -> None:
        self._queue = queue
        self._latency = latency
        self._leased: dict[str, dict[int, tuple[float, int]]] = {}

    async def put(self, envelopes: Sequence[Envelope]) -> None:
        await self._queue.put(envelopes)

    async def lease(self, device_id: str, limit: int) -> list[Leased]:
        items = await self._queue.lease(device_id, limit)
        if items:
            now = time.monotonic()
            mine = self._leased.setdefault(device_id, {})
            for item in items:
                mine[item.lease_id] = (now, item.envelope.oldest_ts_ms)
        return items

    def ack(self, device_id: str, lease_id: int) -> None:
        self._queue.ack(device_id, lease_id)
        taken = self._leased.get(device_id, {}).pop(lease_id, None)
        if taken is not None:
            leased_at, oldest_ms = taken
            self._latency.puback.observe(time.monotonic() - leased_at)
            if oldest_ms:
                self._latency.read_to_hub.observe(max(0.0, time.time() - oldest_ms / 1000))

    def release(self, device_id: str) -> None:
        self._queue.release(device_id)
        self._leased.pop(device_id, None)

    def close(self) -> None:
        self._queue.close()

    def depth(self) -> list[DeviceDepth]:
        return self._queue.depth()

    def holds(self, device_id: str) -> bool:
        return self._queue.holds(device_id)

    def pending(self, device_id: str) -> int:
        return self._queue.pending(device_id)


def _counter(name: str, doc: str, labels: Sequence[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=list(labels))


def _gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


class GatewayCollector(Collector):
    """Reads the running gateway at scrape time. ``start_seq``: each device's next sequence
    number when this run began, so that readings sealed in this run are the difference."""

    def __init__(self, gateway: Gateway, start_seq: dict[str, int]) -> None:
        self._gw = gateway
        self._start_seq = dict(start_seq)
        # Whether each device's identity is verified follows from its config alone: worked out
        # once per config (identity_state looks its device up in the list: quadratic per scrape).
        self._verified: tuple[object, dict[str, bool]] = (None, {})
        # The sessions of the previous scrape, and the disconnects of those since ended.
        self._stats: dict[str, SessionStats] = {}
        self._retired: dict[str, int] = {}

    def _verified_of(self, gw: Gateway) -> dict[str, bool]:
        config, verified = self._verified
        if config is not gw.config:
            verified = {}
            self._verified = (gw.config, verified)
        for device_id in gw.health.keys() - verified.keys():
            # A quarantined device's identity state says no "verified": asked again next time.
            known = gw.identity_state(device_id).get("verified")
            if known is not None:
                verified[device_id] = bool(known)
        return verified

    def collect(self) -> Iterable[Metric]:
        gw = self._gw
        yield from self._gateway(gw)
        yield from self._devices(gw)
        yield from self._store(gw)
        yield from self._uplink(gw)
        yield from self._links(gw)
        yield from self._events(gw)

    def _gateway(self, gw: Gateway) -> Iterable[Metric]:
        info = _gauge("fieldgate_boot_info", "This run of the gateway (value 1)", ["boot_id"])
        info.add_metric([gw.boot_id], 1)
        yield info
        step = gw.step
        read = _counter(
            "fieldgate_readings_read", "Readings of admitted devices taken in, this run"
        )
        read.add_metric([], step.readings if step is not None else 0)
        yield read
        unavailable = _counter(
            "fieldgate_readings_unavailable",
            "Of the readings read, points that could not be read (sent as a marker, no value)",
        )
        unavailable.add_metric([], step.unavailable if step is not None else 0)
        yield unavailable
        dropped = _counter(
            "fieldgate_readings_dropped",
            "Readings dropped or refused by the store when full, this run",
        )
        dropped.add_metric([], gw.counters.dropped_readings)
        yield dropped

    def _devices(self, gw: Gateway) -> Iterable[Metric]:
        sealed = _counter(
            "fieldgate_device_readings_sealed",
            "Readings sealed into envelopes this run (read, admitted, batched and sealed; an "
            "open batch counts at its close)",
            ["device"],
        )
        delivered = _counter(
            "fieldgate_device_readings_delivered",
            "Readings the hub acknowledged (PUBACK) this run",
            ["device"],
        )
        reads = _counter(
            "fieldgate_device_reads", "Reads of the device by outcome", ["device", "outcome"]
        )
        malformed = _counter(
            "fieldgate_device_malformed",
            "Answers that were wrong (not matching their request, bad values) by cause",
            ["device", "cause"],
        )
        state = _gauge(
            "fieldgate_device_state", "1 for the device's current state", ["device", "state"]
        )
        since = _gauge(
            "fieldgate_device_state_since_timestamp_seconds",
            "When the device entered its current state (Unix time)",
            ["device"],
        )
        last_read = _gauge(
            "fieldgate_device_last_read_timestamp_seconds",
            "When the device was last read successfully (Unix time; absent: not yet this run)",
            ["device"],
        )
        verified = _gauge(
            "fieldgate_device_verified",
            "1: the device's identity is verified (TLS, bond, fingerprint); 0: unverified",
            ["device"],
        )
        seq = gw.sealer.next_seq if gw.sealer is not None else {}
        is_verified = self._verified_of(gw)
        for device_id, health in gw.health.items():
            d = [device_id]
            sealed.add_metric(d, seq.get(device_id, 0) - self._start_seq.get(device_id, 0))
            session = gw.sessions.get(device_id)
            delivered.add_metric(d, session.stats.readings_acked if session is not None else 0)
            reads.add_metric([device_id, "ok"], health.reads_ok)
            reads.add_metric([device_id, "failed"], health.reads_failed)
            for cause, count in health.malformed_causes.items():
                malformed.add_metric([device_id, cause], count)
            for name in STATES:
                state.add_metric([device_id, name], 1 if health.state == name else 0)
            since.add_metric(d, health.since)
            if health.last_ok is not None:
                last_read.add_metric(d, health.last_ok)
            verified.add_metric(d, 1 if is_verified.get(device_id) else 0)
        yield from (sealed, delivered, reads, malformed, state, since, last_read, verified)

    def _store(self, gw: Gateway) -> Iterable[Metric]:
        queue = gw.queue
        if queue is None:
            return
        queued = _gauge("fieldgate_store_envelopes", "Envelopes in the store", ["device", "state"])
        size = _gauge("fieldgate_store_device_bytes", "Bytes of envelopes in the store", ["device"])
        readings = _gauge(
            "fieldgate_store_readings",
            "Readings in the device's envelopes in the store (queued and leased)",
            ["device"],
        )
        oldest = _gauge(
            "fieldgate_store_oldest_age_seconds",
            "Age of the oldest reading in the store (devices with something stored)",
            ["device"],
        )
        now_ms = time.time() * 1000
        total = 0
        for depth in queue.depth():
            queued.add_metric([depth.device_id, "queued"], depth.queued)
            queued.add_metric([depth.device_id, "leased"], depth.leased)
            size.add_metric([depth.device_id], depth.bytes)
            readings.add_metric([depth.device_id], depth.readings)
            total += depth.bytes
            if depth.oldest_ts_ms is not None and (depth.queued or depth.leased):
                oldest.add_metric([depth.device_id], max(0.0, (now_ms - depth.oldest_ts_ms) / 1000))
        yield from (queued, size, readings, oldest)
        used = _gauge("fieldgate_store_bytes", "Bytes of envelopes in the store, all devices")
        used.add_metric([], total)
        yield used
        limit = _gauge("fieldgate_store_max_bytes", "The store's bound (store.max_bytes)")
        limit.add_metric([], gw.config.store.max_bytes)
        yield limit
        high = _gauge("fieldgate_store_high_water", "1 while the store is over its high water")
        high.add_metric([], 1 if getattr(queue, "_high", False) else 0)
        yield high
        full = _gauge("fieldgate_store_disk_full", "1 while the disk refuses the store's writes")
        full.add_metric([], 1 if getattr(queue, "disk_full", False) else 0)
        yield full
        drops = getattr(queue, "drops", None)
        if isinstance(drops, dict):
            policy = gw.config.store.policy
            dropped = _counter(
                "fieldgate_store_dropped_readings",
                "Readings the store dropped or refused when full, by policy (kept across runs)",
                ["device", "policy"],
            )
            for device_id, (_, readings) in drops.items():
                dropped.add_metric([device_id, policy], readings)
            yield dropped

    def _uplink(self, gw: Gateway) -> Iterable[Metric]:
        connected = _gauge(
            "fieldgate_uplink_connected",
            "1 while the device's hub session is connected",
            ["device"],
        )
        connects = _counter(
            "fieldgate_uplink_connects", "Hub connections made (CONNACK accepted)", ["device"]
        )
        acked = _counter(
            "fieldgate_uplink_envelopes_acked", "Envelopes the hub acknowledged", ["device"]
        )
        up = 0
        # Disconnects are summed over the sessions: per device x reason would be up to 12 more
        # series per device (12,000 at 1,000 devices) for what each device's last error and
        # its security events already tell. A session a reload ended took its counts along:
        # they are kept here (_retired), so that the sum never falls.
        reasons = dict(self._retired)
        current: dict[str, SessionStats] = {}
        for device_id, session in gw.sessions.items():
            stats = current[device_id] = session.stats
            up += stats.connected
            connected.add_metric([device_id], 1 if stats.connected else 0)
            connects.add_metric([device_id], stats.connects)
            acked.add_metric([device_id], stats.envelopes_acked)
            for reason, count in stats.disconnects.items():
                reasons[reason] = reasons.get(reason, 0) + count
        for device_id, stats in self._stats.items():
            if current.get(device_id) is not stats:
                for reason, count in stats.disconnects.items():
                    reasons[reason] = reasons.get(reason, 0) + count
                    self._retired[reason] = self._retired.get(reason, 0) + count
        self._stats = current
        yield from (connected, connects, acked)
        disconnects = _counter(
            "fieldgate_uplink_disconnects",
            "Hub connections lost or refused, by reason (the uplink error's cause), all devices",
            ["reason"],
        )
        for reason, count in sorted(reasons.items()):
            disconnects.add_metric([reason], count)
        yield disconnects
        sessions = _gauge("fieldgate_uplink_sessions", "Hub sessions by state", ["state"])
        sessions.add_metric(["connected"], up)
        sessions.add_metric(["disconnected"], len(gw.sessions) - up)
        yield sessions
        throttle = _gauge(
            "fieldgate_uplink_throttle_delay_seconds",
            "How long a new connect, send or twin request would wait for its throttle now",
            ["throttle"],
        )
        now = _loop_time()
        for name, limiter in gw.limiters.items():
            throttle.add_metric([name], max(0.0, getattr(limiter, "_next", 0.0) - now))
        yield throttle

    def _links(self, gw: Gateway) -> Iterable[Metric]:
        units = _gauge("fieldgate_link_units", "Devices on the link by state", ["link", "state"])
        reads = _counter(
            "fieldgate_link_reads", "Reads served on the link (every device on it)", ["link"]
        )
        waiting = _gauge(
            "fieldgate_link_requests_waiting",
            "Devices on the link with a command request waiting for the wire",
            ["link"],
        )
        attempt = _gauge(
            "fieldgate_link_connect_attempt",
            "Connections in a row that delivered nothing (the backoff step; 0: healthy)",
            ["link"],
        )
        # [[links]] entries only: a device's own connection (an implicit link named after it)
        # would repeat the device's series under another label, 4,000 samples at 1,000 devices.
        configured = {link.name for link in gw.config.links}
        for bus in gw.buses:
            if bus.name not in configured:
                continue
            schedule = bus.schedule
            members = list(bus.units.values())
            off = sum(
                1 for u in members if schedule is not None and schedule.backed_off(u.device_id)
            )
            units.add_metric([bus.name, "backed_off"], off)
            units.add_metric([bus.name, "polled"], len(members) - off)
            reads.add_metric(
                [bus.name], sum(u.health.reads_ok + u.health.reads_failed for u in members)
            )
            waiting.add_metric([bus.name], len(getattr(bus, "_pending", ())))
            attempt.add_metric([bus.name], bus.attempt)
        yield from (units, reads, waiting, attempt)

    def _events(self, gw: Gateway) -> Iterable[Metric]:
        events = gw._events
        if events is not None:
            kinds = _counter(
                "fieldgate_security_events", "Security events recorded this run, by kind", ["kind"]
            )
            for kind, count in sorted(events.counts.items()):
                kinds.add_metric([kind], count)
            yield kinds
            unwritten = _gauge(
                "fieldgate_security_events_unwritten",
                "Security events waiting in memory for the disk to take writes again",
            )
            unwritten.add_metric([], events.unwritten)
            yield unwritten
        control = gw.control
        if control is not None:
            commands = _counter(
                "fieldgate_commands",
                "Cloud commands by channel (method, c2d, twin) and outcome (accepted, refused, "
                "failed, outcome-unknown), this run",
                ["channel", "outcome"],
            )
            for (channel, outcome), count in sorted(control.counts.items()):
                commands.add_metric([channel, outcome], count)
            yield commands
        lag = gw.audit_lag
        if lag is not None:
            pending, age = lag()
            records = _gauge("fieldgate_audit_pending_records", "Audit records not yet sent")
            records.add_metric([], pending)
            yield records
            if age is not None:
                oldest = _gauge(
                    "fieldgate_audit_oldest_age_seconds", "Age of the oldest audit record not sent"
                )
                oldest.add_metric([], age)
                yield oldest


def _loop_time() -> float:
    import asyncio

    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


class Metrics:
    """The registry of one gateway: its collector, the process collectors, the histograms."""

    def __init__(self, gateway: Gateway, start_seq: dict[str, int]) -> None:
        # No `_created` series beside the histograms: the process start time says as much, and
        # they are noise in every dashboard. (A process-wide switch; this is the process's only
        # registry.)
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(namespace="fieldgate", registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.registry.register(GatewayCollector(gateway, start_seq))
        self.latency = Latency(self.registry)
        # Loop seconds the previous scrape's snapshot took: what a scrape costs the gateway's
        # polling (the text is formatted off the loop).
        self.last_snapshot_s = 0.0
        self.registry.register(_ScrapeCost(self))

    def observed(self, queue: EnvelopeQueue) -> ObservedQueue:
        return ObservedQueue(queue, self.latency)

    def snapshot(self) -> list[Metric]:
        """Every family's samples, read now (on the loop: the gateway's state is the loop's)."""
        started = time.perf_counter()
        families = list(self.registry.collect())
        self.last_snapshot_s = time.perf_counter() - started
        return families

    def render(self, accept_encoding: str = "") -> tuple[bytes, dict[str, str]]:
        """The exposition of a snapshot taken now (tests, benchmarks)."""
        return render(self.snapshot(), accept_encoding)


class _ScrapeCost(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        cost = _gauge(
            "fieldgate_scrape_snapshot_seconds",
            "Seconds the previous scrape held the gateway's loop (reading its state)",
        )
        cost.add_metric([], self._metrics.last_snapshot_s)
        yield cost


class _Taken(CollectorRegistry):
    """A snapshot as ``generate_latest`` takes it: a registry whose collect() replays it."""

    def __init__(self, families: list[Metric]) -> None:
        super().__init__(auto_describe=False)
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def render(families: list[Metric], accept_encoding: str = "") -> tuple[bytes, dict[str, str]]:
    """The text of a snapshot and its headers; gzip when the scraper accepts it (Prometheus
    does: the text of a thousand devices shrinks about fifteenfold). Reads only the snapshot,
    so it may run in a thread: formatting is three quarters of a scrape's cost, and off the
    loop it no longer holds up polling for its whole length."""
    body = generate_latest(_Taken(families))
    headers = {"Content-Type": CONTENT_TYPE}
    if "gzip" in accept_encoding:
        body = gzip.compress(body, compresslevel=1)
        headers["Content-Encoding"] = "gzip"
    return body, headers


def family_names(text: str) -> set[str]:
    """The metric families named in an exposition's ``# TYPE`` lines (tests, benchmarks)."""
    out = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            out.add(line.split()[2])
    return out


def samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value of every sample in an exposition (tests, benchmarks)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
