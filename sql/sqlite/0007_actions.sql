-- The executor's durable action schedule and its ledger ("Actions fire once", docs/store.md).
-- Same tables as on Postgres (see sql/postgres/0007_actions.sql for the design); times are
-- INTEGER microseconds since the Unix epoch (UTC), ids TEXT UUIDs, `destructive` 0 or 1.
-- A claim needs no row locks here: SQLite has one writer, and the store claims inside one
-- BEGIN IMMEDIATE transaction.
CREATE TABLE actions (
    action_id        TEXT    PRIMARY KEY NOT NULL,
    input_event_id   TEXT    NOT NULL,
    rule_id          TEXT    NOT NULL,
    rule_version     INTEGER NOT NULL,
    endpoint         TEXT    NOT NULL,
    device_id        TEXT    NOT NULL,
    body             TEXT    NOT NULL,
    destructive      INTEGER NOT NULL CHECK (destructive IN (0, 1)),
    requested_at     INTEGER NOT NULL,
    source_topic     TEXT    NOT NULL,
    source_partition INTEGER NOT NULL,
    source_offset    INTEGER NOT NULL,
    status           TEXT    NOT NULL
                     CHECK (status IN ('pending', 'delivered', 'dead', 'denied', 'suppressed')),
    attempts         INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at  INTEGER,
    last_error       TEXT,
    last_http_status INTEGER,
    updated_at       INTEGER NOT NULL,
    delivered_at     INTEGER,
    CONSTRAINT actions_dedup_key UNIQUE (input_event_id, rule_id, rule_version, endpoint),
    CONSTRAINT actions_pending_have_a_time
        CHECK ((status = 'pending') = (next_attempt_at IS NOT NULL))
);

CREATE INDEX actions_due_idx ON actions (next_attempt_at, action_id) WHERE status = 'pending';
CREATE INDEX actions_finished_idx ON actions (updated_at) WHERE status <> 'pending';

CREATE TABLE action_ledger (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    action_id   TEXT    NOT NULL,
    request_id  TEXT,
    endpoint    TEXT    NOT NULL,
    attempt     INTEGER NOT NULL CHECK (attempt >= 0),
    outcome     TEXT    NOT NULL
                CHECK (outcome IN ('delivered', 'failed', 'retrying', 'denied', 'short_circuited',
                                   'suppressed', 'duplicate', 'dead')),
    http_status INTEGER,
    latency_ms  INTEGER CHECK (latency_ms >= 0),
    error       TEXT,
    at          INTEGER NOT NULL
);

CREATE INDEX action_ledger_action_idx ON action_ledger (action_id, id);
CREATE INDEX action_ledger_at_idx ON action_ledger (at);
