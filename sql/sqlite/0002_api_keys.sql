-- API keys. Only a salted SHA-256 of each secret is kept (the secret is shown once, at
-- creation); a request finds its key by id, the primary key, in one index probe. No
-- last-used column: it would turn every authenticated request into a write.
-- Timestamps are INTEGER microseconds since the Unix epoch, as in 0001_store.sql.
CREATE TABLE api_keys (
    id         TEXT    PRIMARY KEY NOT NULL,
    name       TEXT,
    role       TEXT    NOT NULL CHECK (role IN ('device', 'viewer', 'operator', 'admin')),
    salt       BLOB    NOT NULL CHECK (length(salt) = 16),
    hash       BLOB    NOT NULL CHECK (length(hash) = 32),
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
