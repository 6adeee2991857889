"""The uplink: one MQTT session per device identity, all on one event loop."""
