-- fieldgate store, schema version 1: sealed envelopes, FIFO per device.
CREATE TABLE envelopes (
    id           INTEGER PRIMARY KEY,      -- commit order; FIFO per device by id
    device       TEXT    NOT NULL,
    version      INTEGER NOT NULL,
    key_id       TEXT    NOT NULL,
    boot         TEXT    NOT NULL,
    first_seq    INTEGER NOT NULL,
    count        INTEGER NOT NULL,
    codec        TEXT    NOT NULL,
    oldest_ts_ms INTEGER NOT NULL,
    body         BLOB    NOT NULL          -- nonce || AES-256-GCM ciphertext: never plaintext
);
CREATE INDEX envelopes_by_device ON envelopes (device, id);

-- The next sequence number per device, committed with the envelopes that consumed the ones
-- before it: a reading is accepted exactly when this moves past it.
CREATE TABLE sequences (
    device   TEXT PRIMARY KEY,
    next_seq INTEGER NOT NULL
);

-- Envelopes dropped by the full-store policy, counted per device (never silently).
CREATE TABLE drops (
    device    TEXT PRIMARY KEY,
    envelopes INTEGER NOT NULL,
    readings  INTEGER NOT NULL
);

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
