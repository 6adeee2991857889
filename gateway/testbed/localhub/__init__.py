"""The local IoT Hub stand-in: mosquitto with IoT Hub's rules, and a hub-side consumer."""
