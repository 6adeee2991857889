"""The store: sealed envelopes between the sealer and the uplink.

    queue.py   the put/lease/ack contract both queues keep (EnvelopeQueue), Leased, DeviceDepth
    ledger.py  pure bookkeeping both queues share: FIFOs, leases, bytes, drop victims
    memory.py  the in-memory queue (store.kind = "memory")
    sqlite.py  the durable queue on SQLite (the only apsw import), small read/write helpers
    auditdb.py the audit log's own SQLite file (audit.db): its records, heads, stream position
    inspect.py offline inspection (status, accepted, verify, waiting) and moves between stores
    paths.py   where a config's store is, each worker's, and every store a run may have left
    schema/    one schema_vN.sql per version

What the rest of fieldgate uses is re-exported here.
"""

from gateway.store.inspect import accepted, move_envelopes, status, verify, waiting
from gateway.store.memory import MemoryQueue
from gateway.store.sqlite import SeqMarks, Store, StoreCorrupt, StoreError

__all__ = [
    "MemoryQueue",
    "SeqMarks",
    "Store",
    "StoreCorrupt",
    "StoreError",
    "accepted",
    "move_envelopes",
    "status",
    "verify",
    "waiting",
]
