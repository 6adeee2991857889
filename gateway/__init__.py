"""fieldgate: a secure field gateway from legacy devices to Azure IoT Hub."""

__version__ = "0.1.0"
