"""Device protocol adapters: each turns a device into readings for the gateway."""
