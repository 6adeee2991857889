"""Test tools: simulated BLE peripherals behind a simulated bluetoothd. Never imported by
the product."""
