"""Stand-ins for what an IoT Edge device gives a module: the workload API (token signing, the
trust bundle) and edgeHub (the local hub stand-in, letting module identities in by SAS token).
"""
