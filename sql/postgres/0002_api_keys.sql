-- API keys. Only a salted SHA-256 of each secret is kept (the secret is shown once, at
-- creation); a request finds its key by id, the primary key, in one index probe. No
-- last-used column: it would turn every authenticated request into a write.
CREATE TABLE api_keys (
    id         text        PRIMARY KEY,
    name       text,
    role       text        NOT NULL CHECK (role IN ('device', 'viewer', 'operator', 'admin')),
    salt       bytea       NOT NULL CHECK (octet_length(salt) = 16),
    hash       bytea       NOT NULL CHECK (octet_length(hash) = 32),
    created_at timestamptz NOT NULL,
    revoked_at timestamptz
);
