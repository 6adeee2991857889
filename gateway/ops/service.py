"""What the gateway enters to be seen: the ops listener, the status socket, systemd's
notifications. :class:`Operations` is built before the sessions (they take its observed queue
when metrics are on) and entered around the uplink's task group::

    ops = Operations(gateway, stop)
    sessions = ... DeviceSession(..., ops.observed(queue), ...)
    async with ops.serving(), asyncio.TaskGroup() as uplink:
        ... start sessions and pollers ...

``serving()`` opens the listeners (a port or socket that cannot be opened refuses the start,
naming the setting), sends ``READY=1`` once the tasks started with it have been created (the
next turn of the loop), pings the watchdog from the loop, sends ``STOPPING=1`` when ``stop``
is set, and closes everything (removing ``status.sock``) when the gateway has drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from gateway.core import codec
from gateway.core.errors import StartupError
from gateway.ops import status
from gateway.ops.health import Readiness, readiness
from gateway.ops.http import OpsServer, Response
from gateway.ops.notify import Notifier
from gateway.store.queue import EnvelopeQueue

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.ops.metrics import Metrics

log = logging.getLogger("fieldgate.ops")


class Operations:
    def __init__(
        self, gateway: Gateway, stop: asyncio.Event, notifier: Notifier | None = None
    ) -> None:
        self._gw = gateway
        self._stop = stop
        self.notifier = notifier or Notifier()
        settings = gateway.config.metrics
        start_seq = dict(gateway.sealer.next_seq) if gateway.sealer is not None else {}
        self.metrics: Metrics | None = None
        if settings is not None:
            # prometheus_client loads only where [metrics] is configured.
            from gateway.ops.metrics import Metrics

            self.metrics = Metrics(gateway, start_seq)
        self.http: OpsServer | None = None

    def observed(self, queue: EnvelopeQueue) -> EnvelopeQueue:
        """The queue the uplink sessions use: timed when metrics are on."""
        return self.metrics.observed(queue) if self.metrics is not None else queue

    def link_observer(self, link: str, configured: bool) -> Callable[[float], None] | None:
        """The hook a Modbus bus calls with each request's seconds on the wire (None when
        metrics are off: the hot path then pays one test). ``configured``: a ``[[links]]``
        entry, with a series of its own; devices' own connections share one."""
        return self.metrics.latency.link(link, configured) if self.metrics is not None else None

    def readiness(self) -> Readiness:
        gw = self._gw
        queue = gw.queue
        problem = None
        if queue is None:
            problem = "not open"
        elif getattr(queue, "disk_full", False):
            problem = "the disk is full: new readings are not kept"
        return readiness(
            stopping=self._stop.is_set(),
            store_problem=problem,
            connected={d: s.stats.connected for d, s in gw.sessions.items()},
        )

    # -- routes -----------------------------------------------------------------------------

    async def _metrics(self, _path: str, headers: dict[str, str]) -> Response:
        assert self.metrics is not None
        from gateway.ops.metrics import render

        families = self.metrics.snapshot()
        encoding = headers.get("accept-encoding", "")
        body, extra = await asyncio.to_thread(render, families, encoding)
        return Response(200, body, extra)

    async def _healthz(self, _path: str, _headers: dict[str, str]) -> Response:
        return Response(200, b"ok\n", {"Content-Type": "text/plain; charset=utf-8"})

    async def _readyz(self, _path: str, _headers: dict[str, str]) -> Response:
        state = self.readiness()
        return Response(
            200 if state.ready else 503, state.body(), {"Content-Type": "application/json"}
        )

    def _status(self) -> bytes:
        state = self.readiness()
        ready = {"ready": state.ready, "reasons": state.reasons}
        return codec.dumps(status.document(self._gw, stopping=self._stop.is_set(), ready=ready))

    # -- lifetime ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        gw = self._gw
        settings = gw.config.metrics
        sock = status.socket_path(gw.config.gateway.state_dir)
        status_server: asyncio.Server | None = None
        try:
            status_server = await status.serve(sock, self._status)
        except OSError as err:
            # Not worth refusing the start over (a state folder deeper than a unix socket's
            # 107 bytes of path, say): the gateway runs, `fieldgate status` cannot reach it.
            log.warning(
                "status socket %s: %s: `fieldgate status` cannot reach this gateway", sock, err
            )
        try:
            if settings is not None:
                host, port = settings.address
                self.http = OpsServer(
                    {"/metrics": self._metrics, "/healthz": self._healthz, "/readyz": self._readyz}
                )
                try:
                    await self.http.start(host, port)
                except OSError as err:
                    raise StartupError(
                        f"metrics.listen: cannot listen on {settings.listen}: {err.strerror or err}"
                    ) from err
                log.info("metrics, /healthz and /readyz on http://%s/", settings.listen)
            # The next turn: after the caller created the session and poller tasks.
            asyncio.get_running_loop().call_soon(self.notifier.send, "READY=1")
            # Two named tasks, not a TaskGroup: a group around the caller's body would wrap
            # whatever the gateway raises in one more ExceptionGroup. They cannot fail (a send
            # logs its error), and end here.
            background = [asyncio.create_task(self._stopping(), name="ops-stopping")]
            if self.notifier.watchdog is not None:
                background.append(asyncio.create_task(self._watchdog(), name="ops-watchdog"))
            try:
                yield
            finally:
                for task in background:
                    task.cancel("the gateway stopped")
                await asyncio.gather(*background, return_exceptions=True)
        finally:
            if self.http is not None:
                await self.http.close()
            if status_server is not None:
                status_server.close()
                with contextlib.suppress(FileNotFoundError):
                    sock.unlink()
            self.notifier.close()

    async def _stopping(self) -> None:
        await self._stop.wait()
        self.notifier.send("STOPPING=1")

    async def _watchdog(self) -> None:
        """``WATCHDOG=1`` from the loop itself: a loop that stops turning stops the pings."""
        interval = self.notifier.watchdog
        assert interval is not None
        while True:
            self.notifier.send("WATCHDOG=1")
            await asyncio.sleep(interval)
