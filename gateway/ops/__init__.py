"""Operations: what lets an operator see and trust a running gateway.

- :mod:`gateway.ops.metrics`: the Prometheus exposition (``[metrics] listen``), read from the
  gateway's own state at scrape time, so the hot path pays nothing for it;
- :mod:`gateway.ops.health`: ``/healthz`` and ``/readyz``, decided by a pure function;
- :mod:`gateway.ops.http`: the small asyncio HTTP listener serving both, on the gateway's loop;
- :mod:`gateway.ops.status`: the ``status.sock`` unix socket and ``fieldgate status``;
- :mod:`gateway.ops.notify`: systemd readiness, watchdog and stopping notifications;
- :mod:`gateway.ops.logs`: ``--log-format json``;
- :mod:`gateway.ops.service`: the one context manager the gateway enters to run all of them.
"""
