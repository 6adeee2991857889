"""fieldgate as an Azure IoT Edge module: its config from the module twin, its state in the
reported properties, its methods on the module identity.

:mod:`.env` and :mod:`.twin` are pure; :mod:`.module` is the one module that imports
azure-iot-device (the ``edge`` extra), and only when module mode runs.
"""
